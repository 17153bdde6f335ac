"""Losses of B-MTARD and its baselines (SPEC 1.2, 1.7).

Every function returns a per-example vector of shape [B] in float32, so that callers reduce it themselves:
`tf.nn.compute_average_loss` for gradients under a distribution strategy, a cross-replica mean for statistics.
"""

import tensorflow as tf

LOG_EPSILON = 1e-5  # the reference adds 1e-5 inside log(p) of the teacher probabilities


def teacher_probabilities(teacher_logits, temperature=1.0):
    """p = softmax(z / tau), in float32."""
    return tf.nn.softmax(tf.cast(teacher_logits, tf.float32) / temperature, axis=-1)


def distillation_kl(student_logits, teacher_probs):
    """Per-example mean over classes of p * (log(p + 1e-5) - log softmax(z)): the reference's KL / C."""
    log_student = tf.nn.log_softmax(tf.cast(student_logits, tf.float32), axis=-1)
    return tf.reduce_mean(teacher_probs * (tf.math.log(teacher_probs + LOG_EPSILON) - log_student), axis=-1)


def teacher_entropy(teacher_probs):
    """E = per-example mean over classes of p * log(p + 1e-5): a negative entropy / C (<= 0 up to the 1e-5)."""
    return tf.reduce_mean(teacher_probs * tf.math.log(teacher_probs + LOG_EPSILON), axis=-1)


def cross_entropy(labels, logits):
    """Per-example softmax cross-entropy against integer labels."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32))


def kl_divergence(target_logits, logits, temperature=1.0):
    """Per-example KL(softmax(target/tau) || softmax(logits/tau)), summed over classes (PyTorch's batchmean KL)."""
    target_log_probs = tf.nn.log_softmax(tf.cast(target_logits, tf.float32) / temperature, axis=-1)
    log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32) / temperature, axis=-1)
    return tf.reduce_sum(tf.exp(target_log_probs) * (target_log_probs - log_probs), axis=-1)


def class_mean_kl_divergence(target_logits, logits, temperature=1.0):
    """Per-example KL(softmax(target/tau) || softmax(logits/tau)) / C: PyTorch's default `nn.KLDivLoss()` (a mean
    over the B x C entries), the reduction of the ARD and AdaAD reference code on CIFAR-10."""
    num_classes = tf.cast(tf.shape(logits)[-1], tf.float32)
    return kl_divergence(target_logits, logits, temperature) / num_classes


def margin_loss(labels, logits, kappa=50.0):
    """CW-inf attack objective, to maximise: -max(z_y - max_{j != y} z_j, -kappa)."""
    logits = tf.cast(logits, tf.float32)
    one_hot = tf.one_hot(tf.cast(labels, tf.int32), tf.shape(logits)[-1], dtype=tf.float32)
    true_logit = tf.reduce_sum(one_hot * logits, axis=-1)
    best_other = tf.reduce_max(logits - one_hot * 1e9, axis=-1)
    return -tf.maximum(true_logit - best_other, -kappa)
