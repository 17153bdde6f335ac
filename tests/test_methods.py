"""Every --method's train_step: on a fixed learnable batch, a few steps reduce that method's own loss; only the
student changes; the --method flag chooses the method."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from support import kl_div_elements, log_softmax, softmax, tiny_model
from mtard_tf import config as config_lib, main
from mtard_tf.job import runs
from mtard_tf.methods import losses, registry

STEPS = 15
# Each method's logged terms besides loss and learning_rate.
TERMS = {"natural": set(), "sat": set(), "trades": {"cross_entropy", "kl_robust"},
         "ard": {"kl_adv", "cross_entropy"}, "rslad": {"kl_adv", "kl_nat"}, "adaad": {"kl_adv", "kl_nat"},
         "mtard": {"kl_adv", "kl_nat", "weight_adv", "weight_nat", "temperature_adv", "temperature_nat",
                   "entropy_adv", "entropy_nat"}}
TERMS["b_mtard"] = TERMS["mtard"]


def learnable_batch(num_examples=40, num_classes=10, seed=0):
    """Images whose class is their colour (plus noise): a tiny conv net learns it within a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_examples) % num_classes
    colours = rng.uniform(0.1, 0.9, (num_classes, 1, 1, 3))
    images = np.clip(colours[labels] + rng.normal(0, 0.03, (num_examples, 32, 32, 3)), 0, 1)
    return tf.data.Dataset.from_tensors((images.astype(np.float32), labels.astype(np.int32))).repeat()


def confident_teacher(name, scale):
    """A random tiny net with sharpened logits, so its soft labels carry something to learn."""
    teacher = tiny_model(name, width=8)
    kernel, bias = teacher.layers[-1].get_weights()
    teacher.layers[-1].set_weights([scale * kernel, scale * bias])
    return teacher


@pytest.fixture(scope="module")
def initial_weights():
    keras.utils.set_random_seed(5)
    return {name: tiny_model(name, width=8).get_weights() for name in ("student",)} | {
        name: confident_teacher(name, 30.0).get_weights() for name in ("clean", "robust")}


@pytest.mark.parametrize("method", registry.METHOD_NAMES)
def test_train_step_reduces_its_own_loss_and_updates_only_the_student(method, initial_weights):
    spec = registry.METHODS[method]
    student = tiny_model("student", width=8)
    student.set_weights(initial_weights["student"])
    frozen = {}
    for kind in spec.teachers:
        frozen[kind] = tiny_model(kind, width=8)
        frozen[kind].set_weights(initial_weights[kind])
    trainer = spec.build(student, frozen, config_lib.make(), lambda value: value, epsilon=4 / 255,
                         attack_steps=2, attack_step_size=2 / 255, weight_decay=0.0, eval_attack_steps=0, seed=3)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=False)
    history = trainer.fit(learnable_batch(), epochs=STEPS, steps_per_epoch=1, verbose=0).history

    assert set(history) == {"loss", "learning_rate"} | TERMS[method]
    for name, values in history.items():
        assert np.isfinite(values).all(), name
    loss = np.asarray(history["loss"])
    assert loss[0] > 0
    # The same batch every step: the method's own objective falls clearly (attack noise and BatchNorm aside).
    assert loss[-3:].mean() < 0.85 * loss[:2].mean(), loss
    assert any(not np.allclose(a, b) for a, b in zip(initial_weights["student"], student.get_weights()))
    for kind, teacher in frozen.items():
        for before, after in zip(initial_weights[kind], teacher.get_weights()):
            np.testing.assert_array_equal(before, after)  # BatchNorm moving statistics included


def test_ard_loss_is_tau_squared_kl_per_class_on_clean_teacher_logits():
    """ARD's objective with alpha = 1 is tau^2 * KL(T(x)/tau || S(x')/tau) / C, the reference's nn.KLDivLoss().

    The reference is float64; the logits have a trained network's spread (as in test_method_losses): with logits of
    size 1-4 the KL at tau = 30 is ~1e-3 and float32 cancellation moves it by ~1e-5 relative, differently on each CPU.
    """
    teacher_logits = 5.0 * np.array([[4.0, 0.0, -2.0]])
    student_logits = 5.0 * np.array([[1.0, 2.0, 0.0]])
    expected = kl_div_elements(log_softmax(student_logits / 30.0), softmax(teacher_logits / 30.0)).sum() / 3
    got = float(losses.class_mean_kl_divergence(tf.constant(teacher_logits, tf.float32),
                                                tf.constant(student_logits, tf.float32), 30.0)[0])
    assert got == pytest.approx(expected, rel=1e-5)


def test_flag_names_match_the_registry():
    assert config_lib.METHOD_NAMES == registry.METHOD_NAMES
    assert set(registry.TEACHER_TRAINING) == set(config_lib.TEACHER_METHODS)
    assert set(registry.TEACHER_TRAINING.values()) <= set(registry.METHOD_NAMES)


@pytest.mark.parametrize("argv,method", [
    ([], "b_mtard"),
    (["--method=rslad"], "rslad"),
    (["--method=mtard"], "mtard"),
    (["--flagfile=flags/cifar10.cfg", "--method=ard", "--ard_temperature=10"], "ard"),
])
def test_method_flag(argv, method, monkeypatch):
    monkeypatch.chdir(main.os.path.dirname(main.os.path.dirname(main.__file__)))
    main.define_flags()
    try:
        main.FLAGS(["main", *argv])
        config = config_lib.from_flags(main.FLAGS)
        assert config.method == method
        if method == "ard":
            assert config.baselines.ard_temperature == 10.0 and config.baselines.ard_alpha == 1.0
    finally:
        main.FLAGS.unparse_flags()


def test_method_needing_a_teacher_without_one_is_a_clear_error(mock_cifar, strategies, tmp_path):
    config = config_lib.make(model_dir=str(tmp_path), student="resnet18:width=2,blocks=1", epochs=1,
                             steps_per_epoch=1, batch_size=8, jit_compile="false", verbose=0)
    with pytest.raises(runs.loading.TeacherError, match="method 'ard' needs a robust teacher"):
        runs.train_student(config_lib.replace(config, method="ard"), strategies[1])
    with pytest.raises(config_lib.ConfigError, match="unknown method 'madry'"):
        runs.train_student(config_lib.replace(config, method="madry"), strategies[1])
