"""Losses of B-MTARD and its baselines (the TPAMI 2024 paper's distillation losses, and each baseline's own code).

Every function returns a per-example vector of shape [B] in float32, so that callers reduce it themselves:
`tf.nn.compute_average_loss` for gradients under a distribution strategy, a cross-replica mean for statistics.
Each reference reduces its loss over the batch with a mean (or a sum / B), so the batch mean of a method's vector
below is the scalar its reference code backpropagates.
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
    over the B x C entries), the reduction of the ARD code and of the AdaAD code on CIFAR-10."""
    num_classes = tf.cast(tf.shape(logits)[-1], tf.float32)
    return kl_divergence(target_logits, logits, temperature) / num_classes


def margin_loss(labels, logits, kappa=50.0):
    """CW-inf attack objective, to maximise: -max(z_y - max_{j != y} z_j, -kappa)."""
    logits = tf.cast(logits, tf.float32)
    one_hot = tf.one_hot(tf.cast(labels, tf.int32), tf.shape(logits)[-1], dtype=tf.float32)
    true_logit = tf.reduce_sum(one_hot * logits, axis=-1)
    best_other = tf.reduce_max(logits - one_hot * 1e9, axis=-1)
    return -tf.maximum(true_logit - best_other, -kappa)


# ---------------------------------------------------------------------------------------------------------------
# Each method's training loss, per example. The train_steps in baselines.py and b_mtard.py call these with their
# hyper-parameters (whose defaults are the configuration's, config.py).
# ---------------------------------------------------------------------------------------------------------------


def natural_loss(labels, logits):
    """CE(S(x), y); boyellow/AdaAD main.py L302-304 (`Plain_Clean`, nn.CrossEntropyLoss: mean over the batch)."""
    return cross_entropy(labels, logits)


def sat_loss(labels, adv_logits):
    """CE(S(x'), y), Madry et al.'s PGD-AT; MadryLab/cifar10_challenge model.py L94-97 and train.py L51 (mean_xent)."""
    return cross_entropy(labels, adv_logits)


def trades_loss(labels, logits, adv_logits, beta):
    """CE(S(x), y) + beta * sum_c KL(S(x) || S(x')); yaodongyu/TRADES trades.py L27, L79-83 (KL summed, then / B)."""
    return cross_entropy(labels, logits) + beta * kl_divergence(logits, adv_logits)


def ard_loss(labels, teacher_logits, adv_logits, logits, temperature, alpha):
    """alpha tau^2 KL(T(x)/tau || S(x')/tau) / C + (1 - alpha) CE(S(x), y); goldblum/AdversariallyRobustDistillation
    main.py L113 (nn.KLDivLoss(): mean over B x C) and L127."""
    kl = class_mean_kl_divergence(teacher_logits, adv_logits, temperature)
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * cross_entropy(labels, logits)


def rslad_loss(teacher_logits, adv_logits, logits, adv_weight, kl_scale):
    """kl_scale (w l(S(x'), T(x)) + (1 - w) l(S(x), T(x))), l = distillation_kl; zibojia/RSLAD
    resnet18_rslad_cifar10.py L38-40, L59-63 (kl_scale 10: resnet18_rslad_cifar100.py L63-66)."""
    soft_labels = teacher_probabilities(teacher_logits)
    return kl_scale * (adv_weight * distillation_kl(adv_logits, soft_labels)
                       + (1.0 - adv_weight) * distillation_kl(logits, soft_labels))


def adaad_kl(target_logits, logits):
    """AdaAD's KL(T || S) as its code reduces it: KL / C with C = 10 (boyellow/AdaAD main.py L341-345,
    nn.KLDivLoss(): mean over B x C), the full KL otherwise (L347-351, CIFAR-100: sum over B x C, then / B)."""
    num_classes = tf.shape(logits)[-1]
    divisor = tf.where(tf.equal(num_classes, 10), tf.cast(num_classes, tf.float32), 1.0)
    return kl_divergence(target_logits, logits) / divisor


def adaad_loss(teacher_adv_logits, adv_logits, teacher_logits, logits, alpha):
    """alpha adaad_kl(T(x'), S(x')) + (1 - alpha) adaad_kl(T(x), S(x)); boyellow/AdaAD main.py L341-353."""
    return alpha * adaad_kl(teacher_adv_logits, adv_logits) + (1.0 - alpha) * adaad_kl(teacher_logits, logits)


def multi_teacher_loss(adv_logits, probs_adv, logits, probs_nat, weight_adv, weight_nat, kl_scale):
    """kl_scale (w_adv l(S(x'), p_a) + w_nat l(S(x), p_n)), l = distillation_kl (B-MTARD and MTARD);
    zhaoshiji123/MTARD-extension resnet18_mtard_cifar10.py L56-58, L122-125, L169 (kl_scale 10: zhaoshiji123/MTARD
    mtard/mtard_resnet18_cifar100.py L79-80)."""
    return kl_scale * (weight_adv * distillation_kl(adv_logits, probs_adv)
                       + weight_nat * distillation_kl(logits, probs_nat))
