"""White-box L-infinity attacks shared by training and evaluation: the training PGD (MTARD mtard/mtard_loss.py)
and the FGSM, PGD and CW attacks of the evaluation.

An attack maximises a per-example objective `objective(x_adv) -> [B]` by signed-gradient ascent and returns a
constant tensor (no gradient flows back through it). Inputs live in [0, 1].
"""

import tensorflow as tf

# The objective is multiplied by this power of two before its gradient is taken. Under a mixed_float16 policy the
# backward pass runs in float16, where the small input gradients of confidently classified images underflow to zero
# and sign(0) = 0 stalls the attack; the scale keeps them representable. A power of two scales float32 gradients
# exactly, so it changes no sign in float32 or bfloat16 (float32 exponent range).
GRADIENT_SCALE = 2.0 ** 10


def project(x_adv, x, epsilon):
    """clip_[0,1](clip_[x-eps, x+eps](x_adv))."""
    return tf.clip_by_value(tf.clip_by_value(x_adv, x - epsilon, x + epsilon), 0.0, 1.0)


def normal_start(x, noise, std=0.001):
    """x + std * noise, the start of the reference's student attack (noise ~ N(0, I))."""
    return x + std * noise


def uniform_start(x, noise, epsilon):
    """x + eps * noise projected onto the ball (noise ~ U(-1, 1)): Madry's random start."""
    return project(x + epsilon * noise, x, epsilon)


def input_gradient(objective, x_adv, scale=GRADIENT_SCALE):
    """d (scale * sum(objective(x_adv))) / d x_adv, zero where x_adv does not reach the objective."""
    with tf.GradientTape() as tape:
        tape.watch(x_adv)
        loss = tf.reduce_sum(objective(x_adv)) * scale
    return tape.gradient(loss, x_adv, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def zero_gradient_fraction(objective, x, scale=GRADIENT_SCALE):
    """Fraction of the attack's input-gradient components that are exactly zero at x.

    Near 0 for a working attack; a large value means sign(gradient) = 0 and the attack stalls (float16 underflow).
    """
    gradient = input_gradient(objective, tf.cast(x, tf.float32), scale)
    return tf.reduce_mean(tf.cast(tf.equal(gradient, 0.0), tf.float32))


def pgd(objective, x, x_start, *, epsilon, step_size, steps):
    """Projected gradient ascent: x' <- clip_[0,1](clip_ball(x' + alpha * sign(grad objective(x')))), `steps` times."""
    x = tf.stop_gradient(tf.cast(x, tf.float32))

    def body(i, x_adv):
        return i + 1, project(x_adv + step_size * tf.sign(input_gradient(objective, x_adv)), x, epsilon)

    _, x_adv = tf.while_loop(
        lambda i, _: i < steps, body, (tf.constant(0), tf.cast(x_start, tf.float32)),
        maximum_iterations=steps)
    return tf.stop_gradient(x_adv)


def fgsm(objective, x, *, epsilon):
    """One signed-gradient step of size eps from x, no random start."""
    return pgd(objective, x, x, epsilon=epsilon, step_size=epsilon, steps=1)
