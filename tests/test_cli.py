"""The command line, run as users run it: in a subprocess, on offline mock CIFAR."""

import keras
import pytest

from conftest import run_main, tiny_model

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
    (["--attack_steps=0"], "--attack_steps must be at least 1"),
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
