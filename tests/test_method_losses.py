"""Each method's loss in losses.py against a NumPy transcription of its reference PyTorch code, for C = 10 and
C = 100, reduction included: the batch mean of the per-example vector must be the scalar the reference backpropagates.

PyTorch's reductions written out here: nn.CrossEntropyLoss() and F.cross_entropy average over the batch;
nn.KLDivLoss()(log q, p) is p (log p - log q) element-wise, then 'mean' (the default) divides the sum over B x C by
B x C, size_average=False sums, reduce=False keeps the B x C entries; the MTARD / RSLAD kl_loss(a, b) is
-a b + log(b + 1e-5) b.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from support import kl_div_elements, log_softmax, softmax, tiny_model
from mtard_tf import config as config_lib
from mtard_tf.methods import losses, registry

BATCH = 16
RTOL = 1e-5
CLASSES = (10, 100)


def random_batch(num_classes, seed=0):
    """Labels and student / teacher logits, clean and adversarial, of a fixed random batch (float32)."""
    rng = np.random.default_rng(1000 * seed + num_classes)

    def logits(scale):
        return (scale * rng.standard_normal((BATCH, num_classes))).astype(np.float32)

    return {"labels": rng.integers(0, num_classes, BATCH).astype(np.int32), "student": logits(2.0),
            "student_adv": logits(2.0), "teacher": logits(4.0), "teacher_adv": logits(4.0),
            "teacher_clean": logits(3.0)}


# --- NumPy transcriptions (float64) of the PyTorch operations the reference code uses ---------------------------


def cross_entropy_elements(logits, labels):
    """-log softmax(z)_y per example (F.cross_entropy with reduction='none')."""
    return -log_softmax(logits)[np.arange(len(labels)), labels]


def mtard_kl_loss(a, b):
    """kl_loss(a, b) of the MTARD, MTARD-extension and RSLAD scripts: -a b + log(b + 1e-5) b."""
    return -a * b + np.log(b + 1e-5) * b


def check(per_example, expected_per_example, expected_scalar):
    per_example = np.asarray(per_example)
    assert per_example.shape == (BATCH,) and per_example.dtype == np.float32
    np.testing.assert_allclose(per_example, expected_per_example, rtol=RTOL)
    np.testing.assert_allclose(per_example.astype(np.float64).mean(), expected_scalar, rtol=RTOL)


# --- The methods -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", CLASSES)
def test_natural_loss_is_the_mean_cross_entropy(num_classes):
    # boyellow/AdaAD main.py L302-304: nn.CrossEntropyLoss()(net(inputs), targets).
    b = random_batch(num_classes)
    elements = cross_entropy_elements(b["student"], b["labels"])
    check(losses.natural_loss(b["labels"], b["student"]), elements, elements.mean())


@pytest.mark.parametrize("num_classes", CLASSES)
def test_sat_loss_is_the_mean_cross_entropy_on_adversarial_images(num_classes):
    # MadryLab/cifar10_challenge model.py L94-97: mean_xent = reduce_mean(sparse_softmax_cross_entropy(x_adv)).
    b = random_batch(num_classes)
    elements = cross_entropy_elements(b["student_adv"], b["labels"])
    check(losses.sat_loss(b["labels"], b["student_adv"]), elements, elements.mean())


@pytest.mark.parametrize("num_classes", CLASSES)
@pytest.mark.parametrize("beta", [6.0, 1.0])
def test_trades_loss_is_cross_entropy_plus_beta_summed_kl_over_batch_size(num_classes, beta):
    # yaodongyu/TRADES trades.py L27, L79-83: F.cross_entropy(model(x), y)
    #   + beta * (1 / B) * nn.KLDivLoss(size_average=False)(log_softmax(model(x_adv)), softmax(model(x))).
    b = random_batch(num_classes)
    ce = cross_entropy_elements(b["student"], b["labels"])
    kl = kl_div_elements(log_softmax(b["student_adv"]), softmax(b["student"]))
    scalar = ce.mean() + beta * (1.0 / BATCH) * kl.sum()
    check(losses.trades_loss(b["labels"], b["student"], b["student_adv"], beta), ce + beta * kl.sum(axis=1), scalar)


@pytest.mark.parametrize("num_classes", CLASSES)
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_ard_loss_is_tau_squared_class_mean_kl_plus_cross_entropy(num_classes, alpha):
    # goldblum/AdversariallyRobustDistillation main.py L113, L127: alpha * T * T * nn.KLDivLoss()(log_softmax(S(x')/T),
    #   softmax(T(x)/T)) + (1 - alpha) * nn.CrossEntropyLoss()(S(x), y); KLDivLoss() averages over all B x C entries.
    # Logits five times larger than the other tests', the spread of a trained network's that tau = 30 is meant for:
    # with logits of std 2-4 the KL at tau = 30 is ~1e-2 and float32 cancellation alone (here and in PyTorch) moves
    # it by ~5e-5 relative, which says nothing about the formula.
    b = random_batch(num_classes)
    tau = 30.0
    teacher, student_adv = 5.0 * b["teacher"], 5.0 * b["student_adv"]
    kl = kl_div_elements(log_softmax(student_adv / tau), softmax(teacher / tau))
    ce = cross_entropy_elements(b["student"], b["labels"])
    scalar = alpha * tau * tau * kl.mean() + (1.0 - alpha) * ce.mean()
    per_example = alpha * tau * tau * kl.sum(axis=1) / num_classes + (1.0 - alpha) * ce
    check(losses.ard_loss(b["labels"], teacher, student_adv, b["student"], tau, alpha), per_example, scalar)


@pytest.mark.parametrize("num_classes,kl_scale", [(10, 1.0), (100, 10.0)])
def test_rslad_loss_matches_the_reference_scripts(num_classes, kl_scale):
    # zibojia/RSLAD resnet18_rslad_cifar10.py L38-40, L59-63, and resnet18_rslad_cifar100.py L61-66 (x10, and
    # torch.log(softmax) in place of log_softmax): 5/6 mean(kl_loss(S(x'), T(x))) + 1/6 mean(kl_loss(S(x), T(x))).
    b = random_batch(num_classes)
    p = softmax(b["teacher"])
    log_student = (lambda z: np.log(softmax(z))) if num_classes == 100 else log_softmax
    adv = mtard_kl_loss(log_student(b["student_adv"]), p)
    nat = mtard_kl_loss(log_student(b["student"]), p)
    scalar = 5 / 6.0 * (kl_scale * adv.mean()) + 1 / 6.0 * (kl_scale * nat.mean())
    per_example = kl_scale * (5 / 6 * adv.mean(axis=1) + 1 / 6 * nat.mean(axis=1))
    check(losses.rslad_loss(b["teacher"], b["student_adv"], b["student"], 5 / 6, kl_scale), per_example, scalar)


@pytest.mark.parametrize("num_classes", CLASSES)
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_adaad_loss_uses_the_reference_reduction_of_each_dataset(num_classes, alpha):
    # boyellow/AdaAD main.py L341-353. CIFAR-10: nn.KLDivLoss()(log_softmax(S), softmax(T)), a mean over B x C;
    # CIFAR-100: (1 / B) * sum(nn.KLDivLoss(reduce=False)(...)), the full KL averaged over the batch.
    b = random_batch(num_classes)
    kl_adv = kl_div_elements(log_softmax(b["student_adv"]), softmax(b["teacher_adv"]))
    kl_nat = kl_div_elements(log_softmax(b["student"]), softmax(b["teacher"]))
    if num_classes == 10:
        scalar = alpha * kl_adv.mean() + (1 - alpha) * kl_nat.mean()
        divisor = num_classes
    else:
        scalar = alpha * (1 / BATCH) * kl_adv.sum() + (1 - alpha) * (1 / BATCH) * kl_nat.sum()
        divisor = 1
    per_example = (alpha * kl_adv.sum(axis=1) + (1 - alpha) * kl_nat.sum(axis=1)) / divisor
    check(losses.adaad_loss(b["teacher_adv"], b["student_adv"], b["teacher"], b["student"], alpha), per_example,
          scalar)
    np.testing.assert_allclose(losses.adaad_kl(b["teacher_adv"], b["student_adv"]).numpy(),
                               kl_adv.sum(axis=1) / divisor, rtol=RTOL)


@pytest.mark.parametrize("num_classes,kl_scale", [(10, 1.0), (100, 10.0)])
@pytest.mark.parametrize("temperature_adv,temperature_nat,weight_adv,weight_nat", [
    (1.0, 1.0, 0.5, 0.5),   # MTARD (ECCV 2022): temperatures fixed at 1
    (2.5, 1.3, 0.3, 0.7),   # B-MTARD after some Entropy-Based / Normalization Loss Balance updates
])
def test_multi_teacher_loss_matches_the_reference_scripts(num_classes, kl_scale, temperature_adv, temperature_nat,
                                                          weight_adv, weight_nat):
    # zhaoshiji123/MTARD-extension resnet18_mtard_cifar10.py L56-58, L122-125, L169:
    #   w_adv mean(kl_loss(log_softmax(S(x')), softmax(T_a(x') / tau_a))) + w_nat mean(kl_loss(log_softmax(S(x)),
    #   softmax(T_n(x) / tau_n))), means over B x C; zhaoshiji123/MTARD mtard/mtard_resnet18_cifar100.py L79-80: x10.
    b = random_batch(num_classes)
    p_adv = softmax(b["teacher_adv"] / temperature_adv)
    p_nat = softmax(b["teacher_clean"] / temperature_nat)
    adv = mtard_kl_loss(log_softmax(b["student_adv"]), p_adv)
    nat = mtard_kl_loss(log_softmax(b["student"]), p_nat)
    scalar = weight_adv * (kl_scale * adv.mean()) + weight_nat * (kl_scale * nat.mean())
    per_example = kl_scale * (weight_adv * adv.mean(axis=1) + weight_nat * nat.mean(axis=1))
    probs_adv = losses.teacher_probabilities(b["teacher_adv"], temperature_adv)
    probs_nat = losses.teacher_probabilities(b["teacher_clean"], temperature_nat)
    check(losses.multi_teacher_loss(b["student_adv"], probs_adv, b["student"], probs_nat, weight_adv, weight_nat,
                                    kl_scale), per_example, scalar)


@pytest.mark.parametrize("num_classes", CLASSES)
def test_b_mtard_teacher_entropy_matches_the_reference(num_classes):
    # zhaoshiji123/MTARD-extension resnet18_mtard_cifar10.py L60-62, L128: mean(log(p + 1e-5) p) over B x C.
    b = random_batch(num_classes)
    p = softmax(b["teacher_adv"] / 2.0)
    elements = np.log(p + 1e-5) * p
    entropy = losses.teacher_entropy(losses.teacher_probabilities(b["teacher_adv"], 2.0)).numpy()
    np.testing.assert_allclose(entropy, elements.mean(axis=1), rtol=RTOL)
    np.testing.assert_allclose(entropy.astype(np.float64).mean(), elements.mean(), rtol=RTOL)


# --- kl_scale through the --method registry -----------------------------------------------------------------------


def first_step_loss(method, kl_scale):
    """The logged loss of one train_step of `method` built by the registry, from fixed weights and seeds."""
    keras.utils.set_random_seed(7)
    student = tiny_model("student")
    frozen = {kind: tiny_model(kind) for kind in registry.METHODS[method].teachers}
    trainer = registry.METHODS[method].build(
        student, frozen, config_lib.make(kl_scale=kl_scale), lambda value: value, epsilon=4 / 255,
        attack_steps=1, attack_step_size=2 / 255, weight_decay=0.0, eval_attack_steps=0, seed=3)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
    labels = (np.arange(8) % 10).astype(np.int32)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    return trainer.fit(data, epochs=1, steps_per_epoch=1, verbose=0).history["loss"][0]


@pytest.mark.parametrize("method,factor", [("rslad", 10.0), ("mtard", 10.0), ("b_mtard", 10.0), ("adaad", 1.0)])
def test_kl_scale_multiplies_rslad_and_the_distillers_but_not_adaad(method, factor):
    # RSLAD and MTARD multiply their KL / C terms by 10 on CIFAR-100; AdaAD's code has no such factor (it switches to
    # the full KL instead, losses.adaad_kl), so --kl_scale leaves it unchanged.
    np.testing.assert_allclose(first_step_loss(method, 10.0), factor * first_step_loss(method, 1.0), rtol=1e-6)
