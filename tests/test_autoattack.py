"""Tests of mtard_tf.attacks.autoattack (and the white-box evaluation attacks next to it) on tiny models trained here.

Data: 10 classes of 8x8x3 colour templates (pixels 0.5 +- amp) plus Gaussian noise, learnable in seconds.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

from mtard_tf.attacks import autoattack, white_box
from mtard_tf.evaluation import robustness
from mtard_tf.methods import losses

EPS = 8.0 / 255.0
NUM_CLASSES = 10


def make_data(n, *, amp, noise, seed, size=8):
    templates = 0.5 + amp * np.random.default_rng(123).uniform(-1, 1, (NUM_CLASSES, size, size, 3))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    x = np.clip(templates[y] + rng.normal(0, noise, (n, size, size, 3)), 0, 1).astype(np.float32)
    return x, y


def conv_net():
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(NUM_CLASSES),
    ])


@pytest.fixture(scope="module")
def robust_setup():
    """A small conv net adversarially trained (PGD-3 at eps/2), attacked at eps: clean > FGSM > PGD > AutoAttack."""
    keras.utils.set_random_seed(0)
    x, y = make_data(2000, amp=0.18, noise=0.2, seed=1)
    model = conv_net()
    optimizer = keras.optimizers.Adam(3e-3)

    @tf.function
    def train_step(xb, yb, seed):
        objective = lambda xa: losses.cross_entropy(yb, model(xa, training=False))
        start = white_box.uniform_start(xb, tf.random.stateless_uniform(tf.shape(xb), seed, -1.0, 1.0), EPS / 2)
        x_adv = white_box.pgd(objective, xb, start, epsilon=EPS / 2, step_size=EPS / 4, steps=3)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(losses.cross_entropy(yb, model(x_adv, training=True)))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    step = 0
    for _ in range(5):
        for xb, yb in tf.data.Dataset.from_tensor_slices((x, y)).shuffle(2000, seed=0).batch(64):
            train_step(xb, yb, tf.constant([step, 0], tf.int64))
            step += 1
    x_test, y_test = make_data(128, amp=0.18, noise=0.2, seed=6)
    return model, tf.constant(x_test), tf.constant(y_test)


def accuracy(model, x, y):
    return float(np.mean(autoattack.predict(model, x)[1].numpy() == np.asarray(y)))


def assert_in_ball(x_adv, x, eps=EPS, name=""):
    """Inside [0, 1] exactly and inside the eps-ball up to float32 rounding of x +- eps."""
    x_adv, x = np.asarray(x_adv), np.asarray(x)
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32, name
    assert np.all(np.isfinite(x_adv)), name
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0, name
    assert np.max(np.abs(x_adv - x)) <= eps * (1 + 1e-6) + 1e-7, name


# ------------------------------------------------------------------------------------------------------------------


def test_apgd_checkpoints_follow_the_paper():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): checks after 22, 41, 57, ... iterations.
    p, previous, expected = 0.22, 0.0, []
    while p <= 1.0:
        expected.append(int(round(100 * p)) - 1)
        p, previous = p + max(p - previous - 0.03, 0.06), p
    assert autoattack.apgd_checkpoints(100) == expected == [21, 40, 56, 69, 79, 86, 92, 98]


def test_projection_linf_is_the_minimal_step_onto_the_hyperplane_in_the_box():
    rng = np.random.default_rng(0)
    n, d = 64, 37
    t = rng.uniform(0, 1, (n, d)).astype(np.float32)
    w = rng.normal(0, 1, (n, d)).astype(np.float32)
    w[:, :3] = 0.0
    b = (np.sum(w * t, 1) + rng.normal(0, 6, n)).astype(np.float32)
    step = autoattack.projection_linf(tf.constant(t), tf.constant(w), tf.constant(b)).numpy()
    z = t + step
    assert z.min() >= -1e-6 and z.max() <= 1 + 1e-6
    assert np.all(step[:, :3] == 0)
    c = np.sum(w * t, 1) - b
    room = np.where(w * np.sign(c)[:, None] < 0, 1 - t, t)  # how far each coordinate can move towards the plane
    feasible = np.sum(np.abs(w) * room, 1) >= np.abs(c)
    assert 0 < feasible.sum() < n
    np.testing.assert_allclose(np.sum(w * z, 1)[feasible], b[feasible], atol=1e-4)
    for i in np.flatnonzero(feasible):  # the L-inf norm is minimal: bisection on the radius
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if np.sum(np.abs(w[i]) * np.minimum(mid, room[i])) >= abs(c[i]) else (mid, hi)
        assert abs(np.abs(step[i]).max() - hi) < 1e-5
    # Unreachable planes: go to the corner of the box that gets closest.
    corner = np.where(w * np.sign(c)[:, None] < 0, 1 - t, -t) * (w != 0)
    np.testing.assert_allclose(step[~feasible], corner[~feasible], atol=1e-6)


def test_dlr_losses():
    logits = tf.constant([[3.0, 1.0, 0.5, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5, 0.2]])
    labels = tf.constant([0, 0])
    # correct: -(3 - 1) / (3 - 0.5); wrong: -(0 - 2) / (2 - 0.5)
    np.testing.assert_allclose(autoattack.dlr_loss(labels, logits).numpy(), [-2 / 2.5, 2 / 1.5], rtol=1e-6)
    targets = tf.constant([2, 3])
    # -(z_y - z_t) / (z_1 - (z_3 + z_4) / 2)
    np.testing.assert_allclose(autoattack.dlr_loss_targeted(labels, targets, logits).numpy(),
                               [-(3 - 0.5) / (3 - 0.25), -(0 - 0.5) / (2 - 0.35)], rtol=1e-6)
    np.testing.assert_allclose(autoattack.margin(labels, logits).numpy(), [2.0, -2.0])


def test_square_p_schedule():
    p = [float(autoattack.square_p_schedule(i)) for i in (0, 10, 11, 50, 51, 201, 501, 1001, 2001, 4001, 4999)]
    assert p == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625, 0.00625])


def test_every_attack_stays_in_the_ball_and_leaves_misclassified_images(robust_setup):
    model, x, y = robust_setup
    x, y = x[:48], y[:48]
    clean_wrong = autoattack.predict(model, x)[1].numpy() != y.numpy()
    assert clean_wrong.any()
    results = {
        "apgd-ce": autoattack.apgd(model, x, y, epsilon=EPS, steps=10, restarts=2),
        "apgd-t": autoattack.apgd(model, x, y, epsilon=EPS, steps=10, loss="dlr_targeted", n_target_classes=2),
        "fab-t": autoattack.fab_targeted(model, x, y, epsilon=EPS, steps=10, n_target_classes=2),
        "square": autoattack.square(model, x, y, epsilon=EPS, queries=200),
        "autoattack": autoattack.autoattack_standard(model, x, y, epsilon=EPS, apgd_steps=10, fab_steps=10,
                                                     square_queries=100, n_target_classes=2)[0],
    }
    for name in ("fgsm", "pgd_sat", "pgd_trades", "cw"):
        results[name] = robustness.ATTACKS[name](model, x, y, epsilon=EPS, seed=3)
    for name, x_adv in results.items():
        assert_in_ball(x_adv, x, name=name)
        if name in ("apgd-ce", "apgd-t", "fab-t", "square", "autoattack"):  # only correct images are attacked
            np.testing.assert_array_equal(np.asarray(x_adv)[clean_wrong], x.numpy()[clean_wrong])
    # A larger ball, images at the border of [0, 1].
    x_edge = tf.constant(np.where(x.numpy() > 0.5, 1.0, 0.0).astype(np.float32))
    assert_in_ball(autoattack.apgd(model, x_edge, y, epsilon=0.1, steps=5), x_edge, 0.1)
    assert_in_ball(autoattack.square(model, x_edge, y, epsilon=0.1, queries=50), x_edge, 0.1)
    assert_in_ball(autoattack.fab_targeted(model, x_edge, y, epsilon=0.1, steps=5, n_target_classes=1), x_edge, 0.1)


def test_attacks_repeat_with_a_seed(robust_setup):
    model, x, y = robust_setup
    x, y = x[:32], y[:32]
    a = autoattack.apgd(model, x, y, epsilon=EPS, steps=5, seed=7)
    b = autoattack.apgd(model, x, y, epsilon=EPS, steps=5, seed=7)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    a = autoattack.square(model, x, y, epsilon=EPS, queries=30, seed=7)
    b = autoattack.square(model, x, y, epsilon=EPS, queries=30, seed=7)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_accuracy_ordering_clean_fgsm_pgd_autoattack(robust_setup):
    model, x, y = robust_setup
    clean = accuracy(model, x, y)
    fgsm = accuracy(model, robustness.ATTACKS["fgsm"](model, x, y, epsilon=EPS), y)
    pgd = accuracy(model, robustness.ATTACKS["pgd_sat"](model, x, y, epsilon=EPS, seed=0), y)
    x_aa, robust = autoattack.autoattack_standard(model, x, y, epsilon=EPS, seed=0)  # the full standard budget
    aa = accuracy(model, x_aa, y)
    assert aa == pytest.approx(float(np.mean(robust.numpy())))
    assert clean > 0.7 and aa > 0.05  # a non-trivial regime
    assert clean >= fgsm >= pgd >= aa, (clean, fgsm, pgd, aa)
    assert aa < clean


def test_apgd_ce_finds_at_least_as_many_adversarials_as_pgd20(robust_setup):
    model, x, y = robust_setup
    objective = lambda xa: losses.cross_entropy(y, model(xa, training=False))
    pgd_fooled, apgd_fooled = [], []
    for seed in range(3):
        noise = tf.random.stateless_uniform(tf.shape(x), [seed, 1], -1.0, 1.0)
        x_pgd = white_box.pgd(objective, x, white_box.uniform_start(x, noise, EPS), epsilon=EPS, step_size=2 / 255,
                              steps=20)
        x_apgd = autoattack.apgd(model, x, y, epsilon=EPS, steps=20, seed=seed)
        pgd_fooled.append(len(y) * (1 - accuracy(model, x_pgd, y)))
        apgd_fooled.append(len(y) * (1 - accuracy(model, x_apgd, y)))
    # On this small, nearly linear model both attacks agree to about one image; allow one image for float noise.
    assert np.mean(apgd_fooled) >= np.mean(pgd_fooled) - 1, (apgd_fooled, pgd_fooled)


class RoundInputs(keras.layers.Layer):
    """Rounds pixels to {0, 1}: the gradient of everything after it with respect to the input is zero (None)."""

    def call(self, inputs):
        return tf.round(inputs)


def test_zero_gradient_model_is_not_reported_robust():
    keras.utils.set_random_seed(0)
    x, y = make_data(2000, amp=0.05, noise=0.05, seed=1)
    model = keras.Sequential([keras.Input((8, 8, 3)), RoundInputs(), keras.layers.Flatten(),
                              keras.layers.Dense(NUM_CLASSES)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=5, batch_size=64, verbose=0)
    x_test, y_test = (tf.constant(v) for v in make_data(64, amp=0.05, noise=0.05, seed=6))

    clean = accuracy(model, x_test, y_test)
    assert clean >= 0.9
    # Gradient attacks see a zero gradient and stay where they are (gradient masking) ...
    assert accuracy(model, autoattack.apgd(model, x_test, y_test, epsilon=EPS, steps=20), y_test) >= 0.9
    assert accuracy(model, robustness.ATTACKS["pgd_sat"](model, x_test, y_test, epsilon=EPS), y_test) >= 0.9
    # ... but every image here is breakable (flip the rounding of the pixels within eps of 1/2), and AutoAttack,
    # through Square, does not report the model robust.
    w, b = model.layers[-1].get_weights()
    flat = x_test.numpy().reshape(len(x_test), -1)
    low, high = np.round(np.clip(flat - EPS, 0, 1)), np.round(np.clip(flat + EPS, 0, 1))
    yn = y_test.numpy()
    best_margin = np.full(len(yn), np.inf)
    for j in range(NUM_CLASSES):
        dw = w[:, yn] - w[:, [j]]  # [D, N]
        m = np.minimum(dw.T * low, dw.T * high).sum(1) + b[yn] - b[j]
        best_margin = np.where(yn == j, best_margin, np.minimum(best_margin, m))
    assert np.mean(best_margin < 0) >= 0.9
    x_adv, robust = autoattack.autoattack_standard(model, x_test, y_test, epsilon=EPS, seed=0)
    assert_in_ball(x_adv, x_test)
    assert float(np.mean(robust.numpy())) <= 0.25
    assert accuracy(model, x_adv, y_test) == pytest.approx(float(np.mean(robust.numpy())))
