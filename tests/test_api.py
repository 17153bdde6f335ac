"""The package's public API (mtard_tf/__init__.py): every name resolves and is documented with an example, importing
the package imports neither TensorFlow nor PyTorch, and models that output probabilities are refused where a
trainer is built, with `strip_softmax` as the fix."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtard_tf
from mtard_tf.errors import UserError
from mtard_tf.models.loading import ProbabilityOutputError
from support import ROOT, run_main, tiny_model

TORCH_NAMES = {"convert_checkpoint", "convert_state_dict"}


def test_every_name_of_all_resolves_and_has_a_docstring_with_an_example():
    assert len(mtard_tf.__all__) == len(set(mtard_tf.__all__)) >= 25
    for name in mtard_tf.__all__:
        value = getattr(mtard_tf, name)
        doc = value.__doc__ or ""
        assert "Example" in doc, f"mtard_tf.{name} has no example in its docstring"
        assert doc.strip().split("\n")[0].strip(), name
    assert set(mtard_tf.__all__) <= set(dir(mtard_tf))
    with pytest.raises(AttributeError):
        mtard_tf.no_such_name  # noqa: B018


def test_the_names_are_the_definitions_not_copies():
    from mtard_tf.evaluation import robustness
    from mtard_tf.export import saved_model
    from mtard_tf.methods import b_mtard
    assert mtard_tf.Distiller is b_mtard.Distiller
    assert mtard_tf.export_saved_model is saved_model.export_model
    assert mtard_tf.pgd is robustness.ATTACKS["pgd_sat"] and mtard_tf.fgsm is robustness.ATTACKS["fgsm"]


IMPORTS = """
import sys
import mtard_tf
print(sorted(m for m in ("tensorflow", "keras", "torch") if m in sys.modules))
names = [n for n in mtard_tf.__all__ if n not in {torch_names!r}]
for name in names:
    getattr(mtard_tf, name)
print("torch" in sys.modules)
"""


def test_importing_the_package_imports_neither_tensorflow_nor_torch():
    result = subprocess.run([sys.executable, "-c", IMPORTS.format(torch_names=TORCH_NAMES)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = result.stdout.strip().splitlines()[-2:]
    assert first == "[]"  # import mtard_tf alone
    assert last == "False"  # every name but the importer's: still no torch


def softmax_model(kind, input_shape=(32, 32, 3), num_classes=10):
    """tiny_model's network with its probabilities as output, in one of the ways Keras classifiers are saved."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input(input_shape)
    hidden = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    if kind == "dense":
        return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(hidden))
    logits = keras.layers.Dense(num_classes)(hidden)
    if kind == "softmax_layer":
        return keras.Model(inputs, keras.layers.Softmax()(logits))
    if kind == "activation_layer":
        return keras.Sequential([keras.Model(inputs, logits), keras.layers.Activation("softmax")])
    # "inside": the softmax applied by an op, found by the probe only
    return keras.Model(inputs, keras.layers.Lambda(lambda z: keras.ops.softmax(z))(logits))


@pytest.mark.parametrize("kind", ["dense", "softmax_layer", "activation_layer", "inside"])
def test_a_teacher_that_outputs_probabilities_is_refused_by_the_distiller(kind):
    teacher = softmax_model(kind)
    with pytest.raises(ProbabilityOutputError) as error:
        mtard_tf.Distiller(tiny_model("student"), tiny_model("clean"), teacher)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("the robust teacher outputs probabilities") and "not logits" in message
    assert "strip_softmax" in message and isinstance(error.value, UserError)


def test_a_student_or_single_teacher_that_outputs_probabilities_is_refused():
    with pytest.raises(ValueError, match="the student .* outputs probabilities"):
        mtard_tf.NaturalTrainer(softmax_model("dense"))
    with pytest.raises(ValueError, match="the teacher outputs probabilities"):
        mtard_tf.RSLADTrainer(tiny_model("student"), softmax_model("softmax_layer"))


@pytest.mark.parametrize("kind", ["dense", "softmax_layer", "activation_layer"])
def test_strip_softmax_gives_the_logits_of_the_same_network(kind):
    model = softmax_model(kind)
    logits_model = mtard_tf.strip_softmax(model)
    images = np.random.default_rng(1).uniform(0, 1, (6, 32, 32, 3)).astype(np.float32)
    logits = logits_model(images, training=False).numpy()
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), model(images, training=False).numpy(), atol=1e-6)
    assert not np.allclose(logits.sum(axis=1), 1.0, atol=1e-3)
    mtard_tf.check_logits(logits_model)
    mtard_tf.Distiller(tiny_model("student"), tiny_model("clean"), logits_model)  # accepted now


def test_strip_softmax_refuses_a_model_without_a_softmax_layer():
    with pytest.raises(ValueError, match="no final softmax layer to strip"):
        mtard_tf.strip_softmax(softmax_model("inside"))


@pytest.fixture(scope="module")
def softmax_teachers(tmp_path_factory):
    """A clean teacher file that outputs probabilities (Dense(10, activation="softmax")) and a logits robust one."""
    root = tmp_path_factory.mktemp("softmax_teachers")
    clean, robust = str(root / "clean_softmax.keras"), str(root / "robust.keras")
    softmax_model("dense").save(clean)
    tiny_model("robust").save(robust)
    return clean, robust


def test_the_command_refuses_a_softmax_teacher_in_one_line(mock_metadata_dir, softmax_teachers, tmp_path):
    clean, robust = softmax_teachers
    result = run_main(mock_metadata_dir, "--mode=distill", f"--clean_teacher={clean}", f"--robust_teacher={robust}",
                      "--student=resnet18:width=2,blocks=1", "--epochs=1", "--steps_per_epoch=1", "--batch_size=8",
                      f"--model_dir={tmp_path / 'run'}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert (f"teacher {clean} outputs probabilities (its last layer 'probabilities' applies a softmax), not logits"
            in errors[0]), errors
    assert "--strip_softmax" in errors[0]
    assert "Traceback" not in result.stderr


def test_the_command_strips_the_softmax_when_asked(mock_metadata_dir, softmax_teachers, tmp_path):
    clean, robust = softmax_teachers
    model_dir = tmp_path / "run"
    result = run_main(mock_metadata_dir, "--mode=distill", f"--clean_teacher={clean}", f"--robust_teacher={robust}",
                      "--strip_softmax", "--student=resnet18:width=2,blocks=1", "--epochs=1", "--steps_per_epoch=1",
                      "--batch_size=8", "--attack_steps=1", "--eval_attack_steps=1", "--validation_steps=1",
                      f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model_dir / "student.keras").exists()
    assert json.loads((model_dir / "config.json").read_text())["strip_softmax"] is True
    # The file itself is unchanged: the softmax is stripped from the loaded model only.
    assert mtard_tf.load_model(clean, (32, 32, 3), 10, remove_softmax=True).layers[-1].activation.__name__ == "linear"
    with pytest.raises(ProbabilityOutputError):
        mtard_tf.load_model(clean, (32, 32, 3), 10)


class SubclassedStudent(keras.Model):
    """A subclassed student (no functional graph: its input size is known only when it is called)."""

    def __init__(self, num_classes):
        super().__init__(name="subclassed_student")
        self.conv = keras.layers.Conv2D(4, 3, strides=2, padding="same")
        self.norm = keras.layers.BatchNormalization(synchronized=True)  # replica-independent statistics
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(num_classes)

    def call(self, images, training=False):
        return self.head(self.pool(keras.ops.relu(self.norm(self.conv(images), training=training))))


GRAY_SHAPE, GRAY_CLASSES = (48, 48, 1), 5


def gray_batches(dtype):
    """32 random 48x48 one-channel images of 5 classes in global batches of 8: uint8, or the same as float / 255."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (32, *GRAY_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, GRAY_CLASSES, 32).astype(np.int32)
    if dtype == "float32":
        images = images.astype(np.float32) / 255
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)


def fit_gray(strategy, dtype, log_dir=None):
    """Two B-MTARD steps of a subclassed student with functional 48x48x1 teachers, inside `strategy`'s scope."""
    with strategy.scope():
        keras.utils.set_random_seed(2)
        student = SubclassedStudent(GRAY_CLASSES)
        student(np.zeros((1, *GRAY_SHAPE), np.float32))
        teachers = [tiny_model(name, GRAY_CLASSES, GRAY_SHAPE) for name in ("clean", "robust")]
        distiller = mtard_tf.Distiller(student, *teachers, attack_steps=2, eval_attack_steps=0, weight_rate=0.2,
                                       temperature_rate=0.05, seed=3)
        distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=False)
    callbacks = [mtard_tf.ScalarSummaries(log_dir)] if log_dir else []
    history = distiller.fit(gray_batches(dtype).take(2), epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    return distiller, history.history


def test_a_subclassed_student_and_48x48_gray_teachers_train_alike_on_1_and_2_replicas(strategies, tmp_path):
    one, logs_one = fit_gray(strategies[1], "uint8", str(tmp_path / "logs"))
    two, logs_two = fit_gray(strategies[2], "uint8")
    for a, b in zip(one.student.get_weights(), two.student.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-5)
    for name in ("loss", "weight_adv", "temperature_adv", "temperature_nat"):
        np.testing.assert_allclose(logs_one[name], logs_two[name], rtol=1e-5)
    assert logs_one["weight_adv"][-1] != 0.5  # the balancing moved
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"tensors": 0}).Reload()
    assert {"loss", "kl_adv", "kl_nat", "weight_adv", "weight_nat", "temperature_adv", "temperature_nat",
            "entropy_adv", "entropy_nat", "learning_rate"} <= set(events.Tags()["tensors"])


def test_uint8_batches_train_as_their_float_images(strategies):
    from_uint8, _ = fit_gray(strategies[1], "uint8")
    from_float, _ = fit_gray(strategies[1], "float32")
    for a, b in zip(from_uint8.student.get_weights(), from_float.student.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
