"""--mode=all: every stage runs once, a second run reuses everything; teacher trainers; invalid teachers."""

import os

import numpy as np
import pytest

from mtard_tf import config as config_lib
from mtard_tf.job import runs, stages
from mtard_tf.models import loading

TINY = dict(dataset="cifar10", student="resnet18:width=2,blocks=1", clean_teacher_arch="resnet56:depth=8,width=4",
            robust_teacher_arch="wrn34_10:depth=10,widen=1", epochs=1, clean_teacher_epochs=1,
            robust_teacher_epochs=1, steps_per_epoch=2, batch_size=8, validation_steps=1, attack_steps=1,
            eval_attack_steps=1, jit_compile="false", verbose=0)


def stage_outputs(model_dir):
    names = ["teachers/clean.keras", "teachers/robust.keras", "student.keras", "eval/report.json",
             "eval/clean_teacher/report.json", "eval/robust_teacher/report.json", "export.json"]
    return {name: os.path.getmtime(os.path.join(model_dir, name)) for name in names}


def test_run_all_then_rerun_reuses_every_stage(mock_cifar, strategies, tmp_path, capsys):
    config = config_lib.make(model_dir=str(tmp_path / "run"), attacks=("clean", "fgsm"), num_eval_examples=8,
                             eval_batch_size=8, export_dir=str(tmp_path / "saved_models"), model_name="tiny", **TINY)
    model_dir = config.runtime.model_dir
    first = stages.run_all(config, strategies[1])
    assert first["export"] == str(tmp_path / "saved_models" / "tiny" / "1")
    assert set(first["reports"]["student"]["attacks"]) == {"clean", "fgsm"}
    assert set(first["reports"]["robust teacher"]["attacks"]) == {"clean", "pgd_sat"}
    out = capsys.readouterr().out
    assert "training" in out
    assert "train resnet18:width=2,blocks=1 with b_mtard, 1 epochs x 2 steps" in out  # the plan
    before = stage_outputs(model_dir)

    second = stages.run_all(config, strategies[1])
    out = capsys.readouterr().out
    assert stage_outputs(model_dir) == before  # nothing rewritten
    assert second["export"] == first["export"]
    assert not os.path.exists(tmp_path / "saved_models" / "tiny" / "2")
    for stage in ("clean teacher: using", "robust teacher: using", "student: using", "export: using"):
        assert stage in out
    for path in ("teachers/clean.keras", "teachers/robust.keras", "student.keras"):  # the plan says it reuses them
        assert f"use {os.path.join(model_dir, path)}" in out
    assert "== mtard_tf: done. Accuracy on the first 8 cifar10 test images ==" in out


def test_existing_invalid_teacher_is_an_error_not_retrained(mock_cifar, strategies, tmp_path):
    config = config_lib.make(model_dir=str(tmp_path / "run"), **TINY)
    path = runs.teacher_path(config.runtime.model_dir, "clean")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    with pytest.raises(loading.TeacherError, match="clean.keras"):
        stages.run_all(config, strategies[1])


@pytest.mark.parametrize("kind,method", [("clean", "natural"), ("robust", "trades"), ("robust", "pgd_at")])
def test_train_teacher_writes_model_and_validation_metrics(mock_cifar, strategies, tmp_path, kind, method):
    config = config_lib.make(model_dir=str(tmp_path), robust_teacher_method=method, clean_teacher_method=method,
                             clean_teacher_schedule="step", clean_teacher_milestones=(1,), **TINY)
    path, history = runs.train_teacher(config, kind, strategies[1])
    assert path == os.path.join(str(tmp_path), "teachers", f"{kind}.keras")
    assert np.isfinite(history.history["loss"]).all()
    assert ("val_pgd_accuracy" in history.history) == (method != "natural")
    loading.load_teacher(path, (32, 32, 3), 10)
