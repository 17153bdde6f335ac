"""python -m mtard_tf.reproduce: teachers once, one student per method, the comparison files; a re-run reuses all."""

import json
import os
import subprocess
import sys

from mtard_tf import pipeline, reproduce, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="cifar10", student="resnet56:depth=8,width=2", clean_teacher_arch="resnet56:depth=8,width=2",
            robust_teacher_arch="wrn34_10:depth=10,widen=1", epochs=1, clean_teacher_epochs=1,
            robust_teacher_epochs=1, steps_per_epoch=1, batch_size=8, validation_steps=1, attack_steps=1,
            eval_attack_steps=1, jit_compile=False, verbose=0)
# One method per kind of teacher use (none, the robust teacher, both), to keep the test short: every method's
# train_step is tested in test_baselines.py, and all of them share train_student.
METHODS = ("sat", "rslad", "b_mtard")


def outputs(model_dir):
    """mtime of every model and evaluation report the reproduction keeps."""
    names = ["teachers/clean.keras", "teachers/robust.keras", "eval/clean_teacher/report.json",
             "eval/robust_teacher/report.json"]
    for method in METHODS:
        names += [f"students/{method}/student.keras", f"students/{method}/eval/report.json"]
    return {name: os.path.getmtime(os.path.join(model_dir, name)) for name in names}


def test_reproduce_writes_the_comparison_and_a_rerun_reuses_everything(mock_cifar, strategies, tmp_path, capsys):
    config = training.RunConfig(model_dir=str(tmp_path / "run"), **TINY)
    eval_config = pipeline.EvalConfig(attacks=("clean", "fgsm"), num_examples=8, batch_size=8)
    comparison = reproduce.reproduce(config, eval_config, METHODS, strategies[1])
    before = outputs(config.model_dir)

    with open(tmp_path / "run" / "comparison.json") as f:
        assert json.load(f) == comparison
    rows = comparison["rows"]
    assert [row["name"] for row in rows] == ["clean teacher", "robust teacher", *METHODS]
    assert [row["role"] for row in rows] == ["teacher"] * 2 + ["student"] * len(METHODS)
    assert [row["display_name"] for row in rows] == ["Natural", "TRADES", "SAT", "RSLAD", "B-MTARD"]
    for row in rows:
        assert set(row["accuracy"]) == set(row["w_robust"]) == {"clean", "fgsm"}
        assert 0 <= row["accuracy"]["fgsm"] <= 1 and row["num_examples"] == 8
        assert row["w_robust"]["fgsm"] == (row["accuracy"]["clean"] + row["accuracy"]["fgsm"]) / 2
        assert row["train_seconds"] > 0 and os.path.isfile(row["path"])
    assert comparison["w_robust_attack"] == "fgsm"
    with open(tmp_path / "run" / "students" / "rslad" / "student.json") as f:
        assert json.load(f)["method"] == "rslad"

    markdown = (tmp_path / "run" / "comparison.md").read_text()
    assert "| Model | Method | Clean | FGSM | W-Robust |" in markdown
    assert "| Student (resnet56:depth=8,width=2) | RSLAD |" in markdown
    assert "| Teacher (wrn34_10:depth=10,widen=1) | TRADES |" in markdown
    assert (tmp_path / "run" / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [name for name in os.listdir(tmp_path / "run") if name.startswith(".")]
    capsys.readouterr()

    again = reproduce.reproduce(config, eval_config, METHODS, strategies[1])
    out = capsys.readouterr().out
    assert outputs(config.model_dir) == before  # nothing trained or evaluated again
    assert out.count("student: using") == len(METHODS)
    assert "clean teacher: using" in out and "robust teacher: using" in out
    assert [row["accuracy"] for row in again["rows"]] == [row["accuracy"] for row in rows]


def test_bad_methods_flag_is_one_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mtard_tf.reproduce", "--methods=sat,madry",
                             f"--model_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode != 0
    assert "--methods must be distinct names from natural,sat,trades,ard,rslad,adaad,mtard,b_mtard" in result.stderr
    assert "Traceback" not in result.stderr


def test_unavailable_dataset_is_one_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mtard_tf.reproduce", "--dataset=no_such_dataset",
                             f"--model_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 1
    assert "unknown tensorflow-datasets dataset 'no_such_dataset'" in result.stderr
    assert "Traceback" not in result.stderr
