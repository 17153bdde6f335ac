"""Reliability: exact resume after SIGKILL, determinism (--deterministic), the non-finite-loss guard, clear errors on
bad input, the wall-time estimate, a test run that ends with its result."""

import json
import os
import re
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from support import ROOT, final_state, main_command, run_main, tiny_model, write_teacher_files
from mtard_tf.data import datasets
from mtard_tf.job import checkpointing, wall_time

DISTILL = ["--mode=distill", "--dataset=cifar10", "--student=resnet18:width=2,blocks=1", "--epochs=2",
           "--steps_per_epoch=4", "--batch_size=8", "--validation_steps=1", "--attack_steps=2",
           "--eval_attack_steps=1", "--checkpoint_every_n_steps=1", "--weight_rate=0.3", "--temperature_rate=0.05"]


def test_train_stream_resumes_at_any_step(mock_cifar):
    full = iter(datasets.train_dataset("cifar10", None, 8, seed=5))
    batches = [next(full) for _ in range(20)]  # 2.5 epochs of the 64 mock examples
    for start in (3, 8, 13):
        resumed = iter(datasets.train_dataset("cifar10", None, 8, seed=5, start_step=start))
        for k in range(start, 20):
            images, labels = next(resumed)
            np.testing.assert_array_equal(images.numpy(), batches[k][0].numpy())
            np.testing.assert_array_equal(labels.numpy(), batches[k][1].numpy())
    other_seed = next(iter(datasets.train_dataset("cifar10", None, 8, seed=6)))
    assert not np.array_equal(other_seed[0].numpy(), batches[0][0].numpy())


def test_augmentation_stays_a_shifted_flipped_copy():
    image = tf.random.uniform((32, 32, 3), 0.1, 1.0)
    out = datasets.augment_image(image, tf.constant([1, 2], tf.int64)).numpy()
    padded = np.pad(image.numpy(), ((4, 4), (4, 4), (0, 0)))
    windows = [padded[i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
    assert any(np.array_equal(out, w) or np.array_equal(out, w[:, ::-1]) for w in windows)
    np.testing.assert_array_equal(out, datasets.augment_image(image, tf.constant([1, 2], tf.int64)).numpy())


@pytest.fixture(scope="module")
def uninterrupted_run(mock_metadata_dir, tmp_path_factory):
    """Teachers and the model_dir of one uninterrupted DISTILL run: ([teacher flags], model_dir)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    clean, robust = write_teacher_files(root)
    teachers = [f"--clean_teacher={clean}", f"--robust_teacher={robust}"]
    model_dir = str(root / "run")
    result = run_main(mock_metadata_dir, *DISTILL, *teachers, f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return teachers, model_dir


def final_validation(model_dir):
    """The last validation's accuracies recorded in student.json."""
    with open(os.path.join(model_dir, "student.json")) as f:
        summary = json.load(f)
    return {key: summary[key] for key in ("clean_accuracy", "pgd_accuracy")}


# (checkpoint every N steps, where the run kills itself, the step the re-run resumes from); 4 steps per epoch.
KILL_POINTS = [
    (2, "step_checkpoint:4", 4),  # the step checkpoint of an epoch's last step, taken before that epoch's validation
    (3, "validated:1", 3),  # after the first validation, before the epoch checkpoint: the last one is step 3's
    (3, "epoch_checkpoint:1", 4),  # right after the first epoch's checkpoint
]


@pytest.mark.parametrize("every_n_steps,kill_point,resume_step", KILL_POINTS)
def test_sigkill_at_a_chosen_point_then_rerun_ends_like_an_uninterrupted_run(
        mock_metadata_dir, uninterrupted_run, tmp_path, every_n_steps, kill_point, resume_step):
    teachers, reference_dir = uninterrupted_run
    model_dir = str(tmp_path / "interrupted")
    flags = [*DISTILL, f"--checkpoint_every_n_steps={every_n_steps}", *teachers, f"--model_dir={model_dir}"]
    command, env = main_command(mock_metadata_dir, *flags)
    killed = subprocess.run(command, cwd=ROOT, env={**env, checkpointing.KILL_POINT_VARIABLE: kill_point},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not os.path.exists(os.path.join(model_dir, "student.json"))

    result = run_main(mock_metadata_dir, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from step {resume_step} of 8" in result.stdout
    state, weights = final_state(model_dir)
    reference_state, reference_weights = final_state(reference_dir)
    assert state == pytest.approx(reference_state, rel=1e-5)
    for a, b in zip(weights, reference_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The final validation (its PGD start noise included) is the uninterrupted run's too.
    assert final_validation(model_dir) == final_validation(reference_dir)


def step_logs(model_dir):
    events = EventAccumulator(os.path.join(model_dir, "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return {tag: [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}


def test_same_seed_gives_identical_step_logs(mock_metadata_dir, teacher_files, tmp_path):
    logs = []
    for run in ("a", "b"):
        result = run_main(mock_metadata_dir, *DISTILL, "--epochs=1", f"--clean_teacher={teacher_files[0]}",
                          f"--robust_teacher={teacher_files[1]}", f"--model_dir={tmp_path / run}")
        assert result.returncode == 0, result.stderr[-3000:]
        logs.append(step_logs(str(tmp_path / run)))
    assert logs[0]["loss"] and logs[0] == logs[1]


def test_non_finite_loss_stops_with_the_last_good_checkpoint(mock_metadata_dir, teacher_files, tmp_path):
    model_dir = str(tmp_path / "run")
    base = [*DISTILL, "--epochs=1", f"--robust_teacher={teacher_files[1]}", f"--model_dir={model_dir}"]
    assert run_main(mock_metadata_dir, *base, f"--clean_teacher={teacher_files[0]}").returncode == 0
    os.remove(os.path.join(model_dir, "student.keras"))
    broken = tiny_model("broken")
    broken.set_weights([np.full_like(w, np.nan) for w in broken.get_weights()])
    broken_path = str(tmp_path / "broken.keras")
    broken.save(broken_path)
    result = run_main(mock_metadata_dir, *base, "--epochs=2", f"--clean_teacher={broken_path}")
    assert result.returncode != 0
    assert "the training loss became nan at step 5" in result.stderr
    assert "Traceback" not in result.stderr
    with open(os.path.join(model_dir, "checkpoints", "checkpoint")) as f:
        assert 'model_checkpoint_path: "ckpt-4"' in f.read()
    assert not os.path.exists(os.path.join(model_dir, "student.keras"))


@pytest.mark.parametrize("flags,message", [
    (["--mode=nonsense"], "--mode"),
    (["--attack_step_size=0"], "--attack_step_size must be in (0, 1]"),
    (["--method=nonsense"], "--method"),
])
def test_more_bad_flags(mock_metadata_dir, tmp_path, flags, message):
    result = run_main(mock_metadata_dir, f"--model_dir={tmp_path}", *flags)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_unwritable_model_dir_is_a_clear_error(mock_metadata_dir, teacher_files, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_main(mock_metadata_dir, *DISTILL, f"--clean_teacher={teacher_files[0]}",
                      f"--robust_teacher={teacher_files[1]}", f"--model_dir={blocker / 'run'}")
    assert result.returncode != 0
    assert f"cannot write to --model_dir={blocker / 'run'}" in result.stderr
    assert "Traceback" not in result.stderr


def test_deterministic_runs_give_bit_identical_weights(mock_metadata_dir, teacher_files, tmp_path):
    tiny = ["--steps_per_epoch=4", "--batch_size=8", "--validation_steps=1", "--attack_steps=2",
            "--eval_attack_steps=1", "--deterministic"]
    runs = {
        "trades teacher": ["--mode=train_teacher", "--teacher=robust", "--robust_teacher_method=trades",
                           "--robust_teacher_arch=resnet18:width=2,blocks=1", "--robust_teacher_epochs=1"],
        "b_mtard student": ["--mode=distill", "--method=b_mtard", "--student=resnet18:width=2,blocks=1",
                            "--epochs=2", f"--clean_teacher={teacher_files[0]}",
                            f"--robust_teacher={teacher_files[1]}"],
    }
    for name, flags in runs.items():
        weights = []
        for run in ("a", "b"):
            model_dir = tmp_path / name.replace(" ", "_") / run
            result = run_main(mock_metadata_dir, *flags, *tiny, f"--model_dir={model_dir}")
            assert result.returncode == 0, result.stderr[-3000:]
            assert "deterministic: TensorFlow's op determinism is on, with one thread per op" in result.stdout
            with open(model_dir / "config.json") as f:
                assert json.load(f)["runtime"]["deterministic"] is True
            path = model_dir / ("teachers/robust.keras" if "teacher" in name else "student.keras")
            weights.append(keras.models.load_model(path).get_weights())
        assert len(weights[0]) == len(weights[1])
        for a, b in zip(*weights):
            np.testing.assert_array_equal(a, b, err_msg=name)


class FakeClock:
    def __init__(self, step_seconds):
        self.now, self.step_seconds = 0.0, step_seconds

    def __call__(self):
        self.now += self.step_seconds  # read at a step's begin and at its end: steps of step_seconds
        return self.now


@pytest.mark.parametrize("accelerator,step_seconds,expected", [
    (False, 2.0, ["student (b_mtard): 994 steps left x 2 s per step (measured over 5 steps) = about 33.1 min of "
                  "training here"]),
    (False, 100.0, ["student (b_mtard): 994 steps left x 100 s per step (measured over 5 steps) = about 1.2 days "
                    "of training here",
                    "warning: about 1.2 days on this machine's CPU, which has no accelerator; "
                    "--flagfile=flags/cpu_small.cfg gives a small job that runs on a 2-core CPU in under an hour"]),
    (True, 100.0, ["student (b_mtard): 994 steps left x 100 s per step (measured over 5 steps) = about 1.2 days "
                   "of training here"]),
])
def test_wall_time_estimate_after_the_first_timed_steps(capsys, accelerator, step_seconds, expected):
    estimate = wall_time.WallTimeEstimate("student (b_mtard)", first_step=400, total_steps=1400,
                                          accelerator=accelerator, clock=FakeClock(step_seconds))
    for batch in range(20):  # step 1 (tracing) is not timed; steps 2-6 are; the line comes once, after step 6
        estimate.on_train_batch_begin(batch)
        estimate.on_train_batch_end(batch)
        if batch == 4:
            assert capsys.readouterr().out == ""
    assert capsys.readouterr().out.strip().splitlines() == expected
    assert estimate.estimate == pytest.approx(994 * step_seconds)


def test_pytest_output_ends_with_its_summary():
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider",
                             "tests/test_stats.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.fullmatch(r"\d+ passed in [\d.]+s", lines[-1]), lines[-5:]


def test_training_time_counts_every_sitting_of_a_resumed_run(tmp_path, monkeypatch):
    from mtard_tf.methods import baselines
    clock = [100.0]
    monkeypatch.setattr(checkpointing.time, "time", lambda: clock[0])

    def trainer():
        made = baselines.AdversarialTrainer(tiny_model("student"), method="pgd_at", attack_steps=1)
        made.compile(optimizer=keras.optimizers.SGD(0.1))
        made.optimizer.build(made.model.trainable_variables)
        return made

    first = trainer()
    checkpoints = checkpointing.StepCheckpoints(first, str(tmp_path), max_to_keep=2)
    for step, now in ((4, 110.0), (8, 130.0), (12, 160.0)):
        first.optimizer.iterations.assign(step)
        clock[0] = now
        checkpoints.save()
    with open(tmp_path / checkpointing.TRAIN_SECONDS_FILE) as f:
        assert json.load(f) == {"8": 30.0, "12": 60.0}  # the kept checkpoints' times only
    clock[0] = 175.0  # killed 15 s after the last checkpoint: those seconds are lost with their work

    clock[0] = 1000.0
    resumed = checkpointing.StepCheckpoints(trainer(), str(tmp_path), max_to_keep=2)
    clock[0] = 1002.0
    assert resumed.restore_latest() == 12
    clock[0] = 1007.0
    assert resumed.train_seconds() == pytest.approx(65.0)  # 60 s before the checkpoint, 5 s since the restore
