"""White-box L-infinity attacks shared by training and evaluation (SPEC 1.1 and 2).

An attack maximises a per-example objective `objective(x_adv) -> [B]` by signed-gradient ascent and returns a
constant tensor (no gradient flows back through it). Inputs live in [0, 1].
"""

import tensorflow as tf


def project(x_adv, x, epsilon):
    """clip_[0,1](clip_[x-eps, x+eps](x_adv))."""
    return tf.clip_by_value(tf.clip_by_value(x_adv, x - epsilon, x + epsilon), 0.0, 1.0)


def normal_start(x, noise, std=0.001):
    """x + std * noise, the start of the reference's student attack (noise ~ N(0, I))."""
    return x + std * noise


def uniform_start(x, noise, epsilon):
    """x + eps * noise projected onto the ball (noise ~ U(-1, 1)): Madry's random start."""
    return project(x + epsilon * noise, x, epsilon)


def pgd(objective, x, x_start, *, epsilon, step_size, steps):
    """Projected gradient ascent: x' <- clip_[0,1](clip_ball(x' + alpha * sign(grad objective(x')))), `steps` times."""
    x = tf.stop_gradient(tf.cast(x, tf.float32))

    def body(i, x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            loss = tf.reduce_sum(objective(x_adv))
        gradient = tape.gradient(loss, x_adv, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return i + 1, project(x_adv + step_size * tf.sign(gradient), x, epsilon)

    _, x_adv = tf.while_loop(
        lambda i, _: i < steps, body, (tf.constant(0), tf.cast(x_start, tf.float32)),
        maximum_iterations=steps)
    return tf.stop_gradient(x_adv)


def fgsm(objective, x, *, epsilon):
    """One signed-gradient step of size eps from x, no random start."""
    return pgd(objective, x, x, epsilon=epsilon, step_size=epsilon, steps=1)
