"""The command line, run as users run it: in a subprocess, on offline mock CIFAR."""

import glob
import os
import subprocess
import sys

import keras
import pytest

from support import ROOT, run_main, tiny_model

def test_distill_command_with_two_cpu_replicas(mock_metadata_dir, teacher_files, tmp_path):
    model_dir = tmp_path / "run"
    result = run_main(mock_metadata_dir, "--mode=distill", "--dataset=cifar10", "--student=resnet18:width=2,blocks=1",
                      f"--clean_teacher={teacher_files[0]}", f"--robust_teacher={teacher_files[1]}",
                      "--epochs=1", "--steps_per_epoch=2", "--batch_size=8", "--validation_steps=1",
                      "--attack_steps=1", "--eval_attack_steps=1", "--cpu_replicas=2", f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 replica" in result.stdout + result.stderr
    assert (model_dir / "student.keras").is_file()
    assert (model_dir / "tensorboard").is_dir()
    picture = model_dir / "balance.png"  # the balancing dynamics, drawn from the run's TensorBoard logs
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000


@pytest.fixture
def bad_teacher_files(tmp_path):
    keras.utils.set_random_seed(0)
    wrong_classes = str(tmp_path / "hundred.keras")
    tiny_model("hundred", num_classes=100).save(wrong_classes)
    wrong_shape = str(tmp_path / "small.keras")
    tiny_model("small", input_shape=(16, 16, 3)).save(wrong_shape)
    not_keras = tmp_path / "notes.keras"
    not_keras.write_text("not a model")
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(open(wrong_classes, "rb").read()[:2000])
    return {"classes": wrong_classes, "shape": wrong_shape, "not_keras": str(not_keras),
            "truncated": str(truncated), "missing": str(tmp_path / "missing.keras")}


@pytest.mark.parametrize("flags,message", [
    (["--epsilon=2"], "--epsilon must be in (0, 1]"),
    (["--attack_steps=0"], "--attack_steps=0: 0 is not a positive integer"),
    (["--temperature_min=5", "--temperature_max=2"], "--temperature_min must not exceed --temperature_max"),
    (["--dataset=no_such_dataset"], "unknown tensorflow-datasets dataset 'no_such_dataset'"),
    (["--student=resnet99"], "resnet99"),
    (["--cpu_replicas=2", "--batch_size=7"], "not divisible"),
])
def test_bad_flags_give_one_clear_error(mock_metadata_dir, teacher_files, tmp_path, flags, message):
    result = run_main(mock_metadata_dir, "--mode=distill", f"--clean_teacher={teacher_files[0]}",
                      f"--robust_teacher={teacher_files[1]}", f"--model_dir={tmp_path}", "--epochs=1",
                      "--steps_per_epoch=1", *flags)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind,message", [
    ("classes", "outputs shape (100,), but the dataset has 10 classes"),
    ("shape", "expects input images of shape (16, 16, 3)"),
    ("not_keras", "is not a Keras model"),
    ("truncated", "is not a Keras model"),
    ("missing", "does not exist"),
])
def test_bad_teacher_files_are_named_in_the_error(mock_metadata_dir, teacher_files, bad_teacher_files, tmp_path,
                                                   kind, message):
    result = run_main(mock_metadata_dir, "--mode=distill", f"--clean_teacher={teacher_files[0]}",
                      f"--robust_teacher={bad_teacher_files[kind]}", f"--model_dir={tmp_path}", "--epochs=1")
    assert result.returncode != 0
    assert message in result.stderr and bad_teacher_files[kind] in result.stderr
    assert "Traceback" not in result.stderr


def test_first_line_is_the_programs_own(mock_metadata_dir, tmp_path):
    """TensorFlow's native start-up log (oneDNN, CUDA probe, absl pre-init warning) is held back."""
    model = str(tmp_path / "student.keras")
    tiny_model("student").save(model)
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-m", "mtard_tf.main", "--mode=export", f"--model={model}", f"--data_dir={mock_metadata_dir}",
         f"--model_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'exported'}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.splitlines()[0] == f"export: {tmp_path / 'exported' / 'mtard_student' / '1'}"


# Runs mtard_tf.main with tfds' download made to fail as it does without network access.
FAILING_DOWNLOAD = """import sys, requests, tensorflow_datasets as tfds
def fail(self, *args, **kwargs):
    raise requests.exceptions.ConnectionError("Failed to resolve 'www.cs.toronto.edu'")
tfds.core.DatasetBuilder.download_and_prepare = fail
from mtard_tf import main
main.run()
"""


@pytest.mark.parametrize("download", ["--download", "--nodownload"])
def test_missing_data_without_network_is_one_line_and_exit_1(tmp_path, download):
    empty = tmp_path / "tfds"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-c", FAILING_DOWNLOAD, "--dataset=cifar10", f"--data_dir={empty}",
                             f"--model_dir={tmp_path / 'run'}", download],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    if download == "--download":
        assert "downloading and preparing it in" in result.stdout
        assert "could not be downloaded (ConnectionError: Failed to resolve 'www.cs.toronto.edu')" in errors[0]
    else:
        assert "downloading" not in result.stdout
        assert f"dataset 'cifar10' is not prepared in --data_dir={empty}" in errors[0]


PRESETS = sorted(os.path.relpath(path, ROOT) for pattern in ("flags/*.cfg", "flags/methods/*.cfg")
                 for path in glob.glob(os.path.join(ROOT, pattern)))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_and_method_recipe_parses(preset):
    result = subprocess.run([sys.executable, "-m", "mtard_tf.main", f"--flagfile={preset}", "--only_check_args"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
