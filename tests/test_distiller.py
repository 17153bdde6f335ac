"""The B-MTARD distiller: a fit epoch, replica invariance, TensorBoard tags, the saved student."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from support import tiny_model
from mtard_tf import config as config_lib
from mtard_tf.evaluation import plot
from mtard_tf.job import runs
from mtard_tf.methods.b_mtard import Distiller
from mtard_tf.methods.schedules import MilestoneDecay

BATCH = 16
# What ScalarSummaries logs for a distiller: the logs of Distiller.train_step at every step, of test_step per epoch.
STEP_TAGS = {"loss", "kl_adv", "kl_nat", "weight_adv", "weight_nat", "temperature_adv", "temperature_nat",
             "entropy_adv", "entropy_nat", "learning_rate"}
EPOCH_TAGS = {"clean_accuracy", "pgd_accuracy"}


def random_batches(num_examples=48, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (num_examples, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, num_examples).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(BATCH, drop_remainder=True)


def make_distiller(strategy, weights, synchronized=False, **kwargs):
    """A distiller whose student and teachers start from the given weights (student, clean, robust)."""
    with strategy.scope():
        networks = [tiny_model(name, synchronized=synchronized)
                    for name in ("student", "clean_teacher", "robust_teacher")]
        for network, values in zip(networks, weights):
            network.set_weights(values)
        distiller = Distiller(*networks, attack_steps=3, eval_attack_steps=2, weight_rate=0.2,
                              temperature_rate=0.05, seed=7, **kwargs)
        distiller.compile(optimizer=keras.optimizers.SGD(MilestoneDecay(0.1, [2], 3), momentum=0.9),
                          jit_compile=False)
    return distiller


def initial_weights(synchronized=False):
    keras.utils.set_random_seed(3)
    return [tiny_model(name, synchronized=synchronized).get_weights() for name in ("s", "c", "r")]


def test_fit_updates_only_the_student():
    weights = initial_weights()
    distiller = make_distiller(tf.distribute.get_strategy(), weights)
    history = distiller.fit(random_batches(), epochs=1, verbose=0, validation_data=random_batches(32, seed=1))
    assert np.isfinite(history.history["loss"]).all()
    assert 0 <= history.history["val_pgd_accuracy"][0] <= history.history["val_clean_accuracy"][0] + 1e-6
    student_changed = [not np.allclose(a, b) for a, b in zip(weights[0], distiller.student.get_weights())]
    assert any(student_changed)
    for teacher, before in ((distiller.clean_teacher, weights[1]), (distiller.robust_teacher, weights[2])):
        for a, b in zip(before, teacher.get_weights()):
            np.testing.assert_array_equal(a, b)  # BatchNorm moving statistics included
    state = {k: float(v.numpy()) for k, v in distiller.state_variables().items()}
    assert abs(state["weight_adv"] + state["weight_nat"] - 1) < 1e-6
    assert state["initial_kl_adv"] > 0 and state["initial_kl_nat"] > 0
    assert 1.0 <= min(state["temperature_adv"], state["temperature_nat"])
    assert max(state["temperature_adv"], state["temperature_nat"]) > 1.0  # one teacher got heated


def test_mtard_balance_keeps_temperatures_at_one():
    distiller = make_distiller(tf.distribute.get_strategy(), initial_weights(), balance="mtard", beta=2.0)
    distiller.fit(random_batches(), epochs=1, verbose=0)
    assert float(distiller.temperature_adv.numpy()) == 1.0 == float(distiller.temperature_nat.numpy())
    assert float(distiller.weight_adv.numpy()) != 0.5


def test_one_and_two_replicas_give_the_same_update(strategies):
    weights = initial_weights(synchronized=True)
    results = []
    for replicas in (1, 2):
        strategy = strategies[replicas]
        distiller = make_distiller(strategy, weights, synchronized=True)
        history = distiller.fit(random_batches(), epochs=2, steps_per_epoch=3, verbose=0)
        state = {}
        for name, variable in distiller.state_variables().items():
            per_replica = [float(v.numpy()) for v in strategy.experimental_local_results(variable.value)]
            assert len(per_replica) == replicas
            assert max(per_replica) == min(per_replica), f"{name} differs across replicas: {per_replica}"
            state[name] = per_replica[0]
        results.append((distiller.student.get_weights(), state, history.history))
    (weights_1, state_1, history_1), (weights_2, state_2, history_2) = results
    for a, b in zip(weights_1, weights_2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for name in state_1:
        np.testing.assert_allclose(state_1[name], state_2[name], rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(history_1["loss"], history_2["loss"], rtol=1e-4)
    assert not np.allclose(weights[0][0], weights_1[0])  # the update is not empty


@pytest.mark.parametrize("replicas", [1, 2])
def test_distill_writes_scalars_and_student(mock_cifar, teacher_files, tmp_path, strategies, replicas):
    config = config_lib.make(
        dataset="cifar10", student="resnet18:width=2,blocks=1", clean_teacher=teacher_files[0],
        robust_teacher=teacher_files[1], model_dir=str(tmp_path / "run"), epochs=2, steps_per_epoch=3,
        batch_size=8, validation_steps=1, attack_steps=2, eval_attack_steps=2, milestones=(1,),
        jit_compile="false", verbose=0)
    path, history = runs.train_student(config, strategies[replicas])
    assert path == str(tmp_path / "run" / "student.keras")
    student = keras.models.load_model(path)
    assert student.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0).shape == (2, 10)
    assert history.history["learning_rate"][1] == pytest.approx(0.01)  # decayed at milestone epoch 1

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert tags == STEP_TAGS | EPOCH_TAGS
    assert set(plot.BALANCE_TAGS) <= STEP_TAGS  # the balance plot reads tags the distiller writes
    for tag in STEP_TAGS:
        assert [event.step for event in events.Tensors(tag)] == list(range(1, 7)), tag
    for tag in EPOCH_TAGS:
        assert [event.step for event in events.Tensors(tag)] == [1, 2], tag
    weights = [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("weight_adv")]
    lrs = [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("learning_rate")]
    assert lrs[:3] == pytest.approx([0.1] * 3) and lrs[3:] == pytest.approx([0.01] * 3)
    assert weights[0] == pytest.approx(0.5)  # first step: r_adv = r_nat = 1, weights stay at 1/2
    assert not glob.glob(os.path.join(tmp_path, "run", ".partial-*"))
