"""mtard_tf.methods.keras_repairs: the private Keras / TensorFlow API its overrides rely on is still there, and the
repairs apply to trainers built under MultiWorkerMirroredStrategy only. Fast: nothing is trained."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

from support import tiny_model
from mtard_tf.methods import keras_repairs
from mtard_tf.methods.b_mtard import Distiller
from mtard_tf.methods.trainer import Trainer

UPGRADE_HINT = ("a Keras upgrade changed the private trainer API that "
                "mtard_tf.methods.keras_repairs.MultiWorkerRepairs overrides; check whether the upgrade fixed the "
                "MultiWorkerMirroredStrategy problems (tests/test_scale.py trains on 2 workers), then adapt or remove "
                "the repair")
OVERRIDES = [name for name, value in vars(keras_repairs.MultiWorkerRepairs).items()
             if inspect.isfunction(value) and name.startswith("_")]


@pytest.fixture(scope="module")
def multi_worker_strategy():
    """A MultiWorkerMirroredStrategy without TF_CONFIG: one local worker, built in milliseconds.

    TensorFlow is initialised first, so that the strategy does not configure collective ops for the rest of the
    test session (it only can before initialisation).
    """
    tf.config.list_logical_devices()
    return tf.distribute.MultiWorkerMirroredStrategy()


def test_the_overridden_keras_methods_still_exist_with_the_same_parameters():
    assert keras.backend.backend() == "tensorflow"
    assert sorted(OVERRIDES) == ["_make_function", "_maybe_symbolic_build"]
    for name in OVERRIDES:
        assert hasattr(keras.Model, name), f"keras.Model has no {name}: {UPGRADE_HINT}"
        keras_parameters = list(inspect.signature(getattr(keras.Model, name)).parameters)
        override_parameters = list(inspect.signature(getattr(keras_repairs.MultiWorkerRepairs, name)).parameters)
        assert keras_parameters == override_parameters, (
            f"keras.Model.{name}{keras_parameters} != the override's {override_parameters}: {UPGRADE_HINT}")


def test_keras_still_calls_the_overridden_methods():
    """An override that Keras no longer calls would silently stop repairing."""
    for caller in ("make_train_function", "make_test_function"):
        assert "self._make_function(" in inspect.getsource(getattr(keras.Model, caller)), f"{caller}: {UPGRADE_HINT}"
    for caller in ("fit", "evaluate"):
        assert "self._maybe_symbolic_build(iterator=" in inspect.getsource(getattr(keras.Model, caller)), (
            f"{caller}: {UPGRADE_HINT}")


def test_multi_worker_strategy_still_tells_its_mode(multi_worker_strategy):
    mode = getattr(multi_worker_strategy.extended, "_in_multi_worker_mode", None)
    assert callable(mode), f"MultiWorkerMirroredStrategy.extended has no _in_multi_worker_mode: {UPGRADE_HINT}"
    assert mode() is False  # one local worker: Keras reduces the logs like MirroredStrategy, the repair is off


def make_distiller():
    """A built distiller of tiny networks."""
    distiller = Distiller(tiny_model("student"), tiny_model("clean_teacher"), tiny_model("robust_teacher"))
    distiller(tf.zeros([1, 32, 32, 3]))
    return distiller


def test_repairs_only_under_multi_worker_strategy(strategies, multi_worker_strategy):
    assert not isinstance(Trainer(tiny_model("student")), keras_repairs.MultiWorkerRepairs)
    assert not isinstance(make_distiller(), keras_repairs.MultiWorkerRepairs)
    with strategies[2].scope():
        assert not isinstance(make_distiller(), keras_repairs.MultiWorkerRepairs)

    with multi_worker_strategy.scope():
        trainer = Trainer(tiny_model("student"))
        first, second = make_distiller(), make_distiller()
        rebuilt = type(first)(tiny_model("student"), tiny_model("clean_teacher"), tiny_model("robust_teacher"))
    assert isinstance(trainer, keras_repairs.MultiWorkerRepairs) and isinstance(trainer, Trainer)
    assert isinstance(first, keras_repairs.MultiWorkerRepairs) and isinstance(first, Distiller)
    assert type(first) is type(second) is type(rebuilt)  # one repaired class per trainer class, repaired once
    assert type(first).__name__ == "Distiller" and first.name.startswith("distiller")  # Keras' default name
    assert first.distribute_strategy is multi_worker_strategy


def test_weights_move_between_a_repaired_and_a_plain_trainer(multi_worker_strategy, tmp_path):
    plain = make_distiller()
    for index, variable in enumerate(plain.state_variables().values()):
        variable.assign(index + 0.5)
    path = str(tmp_path / "distiller.weights.h5")
    plain.save_weights(path)
    with multi_worker_strategy.scope():
        repaired = make_distiller()
    repaired.load_weights(path)
    for name, variable in repaired.state_variables().items():
        assert float(variable.numpy()) == float(plain.state_variables()[name].numpy()), name
    for a, b in zip(plain.get_weights(), repaired.get_weights()):
        np.testing.assert_array_equal(a, b)
