"""The two balancing rules of B-MTARD, Entropy-Based Balance and Normalization Loss Balance (MTARD-extension
resnet18_mtard_cifar10.py L128-166), as pure functions of tensors.

The distiller keeps the state in non-trainable variables and calls these once per step with cross-replica
statistics, so every replica computes the same new state.
"""

import tensorflow as tf


def entropy_balance(temperature_adv, temperature_nat, entropy_adv, entropy_nat, rate, t_min, t_max):
    """Entropy-Based Balance: heat the sharper (lower-entropy) teacher.

        tau_a <- clip(tau_a - rate * sign(E_a / E_n - 1)),   tau_n <- clip(tau_n - rate * sign(E_n / E_a - 1)).

    With E <= 0, sign(E_a / E_n - 1) = sign(E_n - E_a) whenever E_n < 0: that form is used so that an entropy of
    exactly 0 (a one-hot teacher) never divides by zero.
    """
    new_adv = temperature_adv - rate * tf.sign(entropy_nat - entropy_adv)
    new_nat = temperature_nat - rate * tf.sign(entropy_adv - entropy_nat)
    return tf.clip_by_value(new_adv, t_min, t_max), tf.clip_by_value(new_nat, t_min, t_max)


def relative_progress(loss, initial_loss, beta=1.0):
    """r = (L / L(0)) ** beta; 0 when L(0) = 0 (nothing left to learn from that teacher)."""
    return tf.math.divide_no_nan(loss, initial_loss) ** beta


def loss_balance(weight_adv, weight_nat, progress_adv, progress_nat, rate):
    """Normalization Loss Balance: w_i <- w_i - rate * (w_i - r_i / (r_adv + r_nat)), then w >= 0 and sum 1.

    If both r are 0 the targets are 1/2 each; if both weights reach 0 they restart at 1/2 each.
    """
    total = progress_adv + progress_nat
    target_adv = tf.where(total > 0, tf.math.divide_no_nan(progress_adv, total), 0.5)
    target_nat = tf.where(total > 0, tf.math.divide_no_nan(progress_nat, total), 0.5)
    new_adv = tf.maximum(weight_adv - rate * (weight_adv - target_adv), 0.0)
    new_nat = tf.maximum(weight_nat - rate * (weight_nat - target_nat), 0.0)
    norm = new_adv + new_nat
    return (tf.where(norm > 0, tf.math.divide_no_nan(new_adv, norm), 0.5),
            tf.where(norm > 0, tf.math.divide_no_nan(new_nat, norm), 0.5))
