"""Distillation KL, teacher entropy and the two balancing rules against NumPy references written here."""

import numpy as np
import pytest

from mtard_tf.methods import balancing, losses

LOGITS_TEACHER = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
LOGITS_STUDENT = np.array([[1.0, 1.0, 0.0], [-2.0, 0.0, 1.0]], np.float32)


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_kl_matches_reference(temperature):
    p = np_softmax(LOGITS_TEACHER / temperature)
    log_q = np.log(np_softmax(LOGITS_STUDENT))
    expected = (p * (np.log(p + 1e-5) - log_q)).mean(axis=-1)
    probs = losses.teacher_probabilities(LOGITS_TEACHER, temperature)
    np.testing.assert_allclose(probs.numpy(), p, rtol=1e-6)
    np.testing.assert_allclose(losses.distillation_kl(LOGITS_STUDENT, probs).numpy(), expected, rtol=1e-5)


def test_teacher_entropy_matches_reference_and_is_sharper_when_colder():
    p = np_softmax(LOGITS_TEACHER)
    expected = (p * np.log(p + 1e-5)).mean(axis=-1)
    np.testing.assert_allclose(losses.teacher_entropy(p).numpy(), expected, rtol=1e-5)
    hot = losses.teacher_entropy(losses.teacher_probabilities(LOGITS_TEACHER, 5.0)).numpy()
    assert np.all(hot < expected)  # higher temperature, more entropy, more negative E


def np_entropy_balance(t_a, t_n, e_a, e_n, rate, lo, hi):
    return (np.clip(t_a - rate * np.sign(e_a / e_n - 1), lo, hi), np.clip(t_n - rate * np.sign(e_n / e_a - 1), lo, hi))


@pytest.mark.parametrize("t_a,t_n,e_a,e_n", [
    (1.0, 1.0, -0.05, -0.20),   # robust teacher sharper: it is heated, clean one clipped at t_min
    (3.0, 3.0, -0.30, -0.10),   # clean teacher sharper
    (9.9995, 1.2, -0.01, -0.02),  # heated past t_max: clipped to 10
    (2.0, 2.0, -0.10, -0.10),   # equal entropies: no change
])
def test_entropy_balance_matches_reference(t_a, t_n, e_a, e_n):
    got = balancing.entropy_balance(t_a, t_n, e_a, e_n, 0.001, 1.0, 10.0)
    np.testing.assert_allclose([float(v) for v in got], np_entropy_balance(t_a, t_n, e_a, e_n, 0.001, 1.0, 10.0),
                               rtol=1e-6)


def test_entropy_balance_clips_to_range():
    t_a, t_n = balancing.entropy_balance(10.0, 1.0, -0.01, -0.5, 0.5, 1.0, 10.0)
    assert float(t_a) == 10.0 and float(t_n) == 1.0
    t_a, t_n = balancing.entropy_balance(1.0, 1.0, -0.5, -0.01, 0.5, 1.0, 10.0)
    assert float(t_a) == 1.0 and float(t_n) == 1.5


def test_entropy_balance_with_zero_entropy_does_not_divide_by_zero():
    t_a, t_n = balancing.entropy_balance(1.0, 1.0, 0.0, -0.2, 0.001, 1.0, 10.0)
    assert np.isfinite([float(t_a), float(t_n)]).all() and float(t_a) > 1.0


def np_loss_balance(w_a, w_n, l_a, l_n, l0_a, l0_n, rate, beta=1.0):
    r_a, r_n = (l_a / l0_a) ** beta, (l_n / l0_n) ** beta
    w_a = max(w_a - rate * (w_a - r_a / (r_a + r_n)), 0.0)
    w_n = max(w_n - rate * (w_n - r_n / (r_a + r_n)), 0.0)
    return w_a / (w_a + w_n), w_n / (w_a + w_n)


@pytest.mark.parametrize("beta", [1.0, 2.0])
@pytest.mark.parametrize("w_a,w_n,l_a,l_n,l0_a,l0_n,rate", [
    (0.5, 0.5, 0.8, 0.2, 1.0, 1.0, 0.025),
    (0.3, 0.7, 0.05, 0.4, 0.1, 0.5, 0.025),
    (0.02, 0.98, 3.0, 0.01, 1.0, 1.0, 0.9),   # a large rate drives a weight below 0 before the max/renormalise
])
def test_loss_balance_matches_reference(w_a, w_n, l_a, l_n, l0_a, l0_n, rate, beta):
    r_a = balancing.relative_progress(l_a, l0_a, beta)
    r_n = balancing.relative_progress(l_n, l0_n, beta)
    got = [float(v) for v in balancing.loss_balance(w_a, w_n, r_a, r_n, rate)]
    np.testing.assert_allclose(got, np_loss_balance(w_a, w_n, l_a, l_n, l0_a, l0_n, rate, beta), rtol=1e-5)
    assert abs(sum(got) - 1.0) < 1e-6 and min(got) >= 0.0


def test_loss_balance_gives_more_weight_to_the_slower_teacher():
    w_a, w_n = balancing.loss_balance(0.5, 0.5, 0.9, 0.3, 0.025)  # adversarial loss fell less
    assert float(w_a) > 0.5 > float(w_n)


def test_loss_balance_renormalises_negative_weights():
    # w_a = 0.01 - 1.5 * (0.01 - 0) < 0 is clipped to 0, then w_n is renormalised to 1.
    w_a, w_n = balancing.loss_balance(0.01, 0.99, 0.0, 1.0, 1.5)
    assert float(w_a) == 0.0 and abs(float(w_n) - 1.0) < 1e-6


def test_loss_balance_with_zero_initial_loss_is_finite():
    r_a = balancing.relative_progress(0.3, 0.0)
    w_a, w_n = balancing.loss_balance(0.5, 0.5, r_a, balancing.relative_progress(0.0, 0.0), 0.025)
    assert np.isfinite([float(w_a), float(w_n)]).all() and abs(float(w_a) + float(w_n) - 1) < 1e-6
