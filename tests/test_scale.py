"""Scale: multi-worker training equals single-worker training; mixed precision keeps the attack alive."""

import json
import os
import socket
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf

from support import ROOT, final_state, main_command, run_main
from mtard_tf.attacks import white_box
from mtard_tf.job import checkpointing, distribute
from mtard_tf.methods import losses

DISTILL = ["--mode=distill", "--dataset=cifar10", "--student=resnet18:width=2,blocks=1", "--sync_batchnorm",
           "--steps_per_epoch=3", "--batch_size=8", "--validation_steps=1", "--attack_steps=2",
           "--eval_attack_steps=1", "--weight_rate=0.3", "--temperature_rate=0.05"]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_workers(metadata_dir, *flags, count=2):
    """Starts `count` worker processes of one MultiWorkerMirroredStrategy cluster on localhost; waits for all."""
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(count)]}
    processes = []
    for index in range(count):
        command, env = main_command(metadata_dir, *flags, "--strategy=multi_worker")
        env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=600))
    finally:
        for process in processes:
            process.kill()
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in outputs]


def test_two_workers_train_like_one_and_resume_from_the_chiefs_checkpoint(mock_metadata_dir, teacher_files,
                                                                          tmp_path):
    # float32: one and two workers sum gradients in different orders, which 16-bit arithmetic magnifies.
    teachers = [f"--clean_teacher={teacher_files[0]}", f"--robust_teacher={teacher_files[1]}", "--precision=float32"]
    reference_dir = str(tmp_path / "one_worker")
    result = run_main(mock_metadata_dir, *DISTILL, *teachers, "--epochs=2", f"--model_dir={reference_dir}")
    assert result.returncode == 0, result.stderr[-3000:]

    model_dir = str(tmp_path / "two_workers")
    first = run_workers(mock_metadata_dir, *DISTILL, *teachers, "--epochs=1", f"--model_dir={model_dir}")
    assert "2 replica(s) in all" in first[0] and "non-chief" in first[1]
    # The second run continues from the chief's checkpoint of step 3 (both workers read it) to step 6.
    second = run_workers(mock_metadata_dir, *DISTILL, *teachers, "--epochs=2", f"--model_dir={model_dir}")
    assert all("resuming from step 3 of 6" in stdout for stdout in second)
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == [
        "checkpoint", "ckpt-3.data-00000-of-00001", "ckpt-3.index", "ckpt-6.data-00000-of-00001", "ckpt-6.index",
        checkpointing.TRAIN_SECONDS_FILE]

    state, weights = final_state(model_dir)
    reference_state, reference_weights = final_state(reference_dir)
    assert state == pytest.approx(reference_state, rel=1e-4)
    for a, b in zip(weights, reference_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_reproduce_refuses_multi_worker(mock_metadata_dir, tmp_path):
    command, env = main_command(mock_metadata_dir, "--strategy=multi_worker", f"--model_dir={tmp_path}")
    command[2] = command[2].replace("from mtard_tf import main", "from mtard_tf import reproduce as main")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "reproduce runs with --strategy=mirrored only" in result.stderr


def small_model(dtype_policy):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.Conv2D(8, 3, padding="same", activation="relu", dtype=dtype_policy)(inputs)
    hidden = keras.layers.GlobalAveragePooling2D(dtype=dtype_policy)(hidden)
    logits = keras.layers.Dense(4, dtype=dtype_policy)(hidden)
    return keras.Model(inputs, keras.layers.Activation("linear", dtype="float32")(logits))


def test_float16_attack_gradient_does_not_underflow():
    images = tf.random.stateless_uniform((16, 8, 8, 3), seed=[0, 1])
    models = {policy: small_model(policy) for policy in ("float32", "mixed_float16")}
    labels = tf.argmax(models["float32"](images), axis=-1)

    def objective(model):
        # A cross-entropy 1e5 times smaller: the size of the loss of a confidently classified image.
        return lambda x: 1e-5 * losses.cross_entropy(labels, model(x, training=False))

    reference = float(white_box.zero_gradient_fraction(objective(models["float32"]), images))
    unscaled = float(white_box.zero_gradient_fraction(objective(models["mixed_float16"]), images, scale=1.0))
    scaled = float(white_box.zero_gradient_fraction(objective(models["mixed_float16"]), images))
    assert reference == 0.0
    assert unscaled > 0.3, "the test objective no longer makes float16 gradients underflow"
    assert scaled < 0.01

    start = white_box.normal_start(images, tf.random.stateless_normal(images.shape, seed=[2, 3]))
    images_adv = white_box.pgd(objective(models["mixed_float16"]), images, start, epsilon=8 / 255,
                               step_size=2 / 255, steps=4)
    # The attack works: it stays in the ball and raises every image's loss.
    assert np.abs(images_adv.numpy() - images.numpy()).max() <= 8 / 255 + 1e-6
    loss = objective(models["mixed_float16"])
    assert np.all(loss(images_adv).numpy() > loss(images).numpy())


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_command_keeps_float32_logits_and_state(mock_metadata_dir, teacher_files, tmp_path,
                                                                precision):
    model_dir = tmp_path / "run"
    result = run_main(mock_metadata_dir, *DISTILL, f"--clean_teacher={teacher_files[0]}",
                      f"--robust_teacher={teacher_files[1]}", "--epochs=1", f"--precision={precision}",
                      f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    student = keras.models.load_model(model_dir / "student.keras")
    convolutions = [layer for layer in student.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convolutions and all(layer.dtype_policy.name == precision for layer in convolutions)
    assert student(tf.zeros((1, 32, 32, 3))).dtype == tf.float32
    with open(model_dir / "student.json") as f:
        state = json.load(f)["state"]
    assert all(np.isfinite(value) for value in state.values())
    assert state["weight_adv"] + state["weight_nat"] == pytest.approx(1.0, abs=1e-6)


def test_writable_dir_is_the_directory_itself_without_a_cluster(strategies, tmp_path):
    assert distribute.is_chief(strategies[2])
    assert distribute.writable_dir(strategies[2], str(tmp_path)) == str(tmp_path)
