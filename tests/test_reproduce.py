"""python -m mtard_tf.reproduce: teachers once, one student per method (or variant) and seed, the comparison files
with intervals and paired tests against B-MTARD (and a variant's own method), the reference recipes and the variant
files; a re-run reuses all."""

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from mtard_tf import config as config_lib, files, reproduce
from mtard_tf.evaluation import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="cifar10", student="resnet56:depth=8,width=2", clean_teacher_arch="resnet56:depth=8,width=2",
            robust_teacher_arch="wrn34_10:depth=10,widen=1", epochs=1, clean_teacher_epochs=1,
            robust_teacher_epochs=1, steps_per_epoch=1, batch_size=8, validation_steps=1, attack_steps=1,
            eval_attack_steps=1, jit_compile="false", verbose=0)
# One method per kind of teacher use (none, the robust teacher, both), to keep the test short: every method's
# train_step is tested in test_baselines.py, and all of them share train_student.
METHODS = ("sat", "rslad", "b_mtard")
# And a variant of one of them (flags/variants/kl10.cfg: --kl_scale=10), tested against B-MTARD and its own method.
ENTRIES = (*METHODS, "rslad@kl10")
EVAL = dict(attacks=("clean", "fgsm"), num_eval_examples=8, eval_batch_size=8)


def outputs(model_dir):
    """mtime of every model and evaluation report the reproduction keeps."""
    names = ["teachers/clean.keras", "teachers/robust.keras", "eval/clean_teacher/report.json",
             "eval/robust_teacher/report.json"]
    for entry in ENTRIES:
        names += [f"students/{entry}/student.keras", f"students/{entry}/eval/report.json"]
    return {name: os.path.getmtime(os.path.join(model_dir, name)) for name in names}


def recomputed_tests(eval_dir, baseline_eval_dir, attacks):
    """The exact McNemar tests of two students, recomputed from their per_image.npz files."""
    with np.load(os.path.join(eval_dir, "per_image.npz")) as a, \
            np.load(os.path.join(baseline_eval_dir, "per_image.npz")) as b:
        np.testing.assert_array_equal(a["labels"], b["labels"])
        return {attack: stats.mcnemar_exact(a[attack], b[attack]) for attack in attacks}


def table_row(markdown, start):
    """The cells of the first table row of `markdown` that starts with `start`."""
    line = next(line for line in markdown.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip("|").split("|")]


def check_bold_marks_significance(comparison):
    """In the single-seed table, a student's accuracy is bold iff its paired test against B-MTARD has p < 0.05, and
    marked † iff a variant's test against its own method has."""
    markdown = reproduce.format_markdown(comparison)
    for row in comparison["rows"]:
        cells = table_row(markdown, f"| {'Student' if row['role'] == 'student' else 'Teacher'} ({row['model']}) | "
                                    f"{row['display_name']} |")[2:]
        for attack, cell in zip(comparison["attacks"], cells):
            for test_name, marked in (("vs_b_mtard", cell.startswith("**")), ("vs_base", cell.endswith(" †"))):
                test = row.get(test_name, {}).get(attack)
                assert marked == (test is not None and test["p_value"] < 0.05), (row["name"], attack, test_name)
        assert not cells[-1].startswith("**") and not cells[-1].endswith("†")  # W-Robust is not tested
    return markdown


def test_reproduce_writes_the_comparison_and_a_rerun_reuses_everything(mock_cifar, strategies, tmp_path, capsys):
    config = config_lib.make(model_dir=str(tmp_path / "run"), **EVAL, **TINY)
    comparison = reproduce.reproduce(config, ENTRIES, strategies[1])
    before = outputs(config.runtime.model_dir)

    with open(tmp_path / "run" / "comparison.json") as f:
        assert json.load(f) == comparison
    rows = comparison["rows"]
    assert [row["name"] for row in rows] == ["clean teacher", "robust teacher", *ENTRIES]
    assert [row["role"] for row in rows] == ["teacher"] * 2 + ["student"] * len(ENTRIES)
    assert [row["display_name"] for row in rows] == ["Natural", "TRADES", "SAT", "RSLAD", "B-MTARD", "RSLAD @kl10"]
    for row in rows:
        assert set(row["accuracy"]) == set(row["w_robust"]) == set(row["ci95"]) == {"clean", "fgsm"}
        assert 0 <= row["accuracy"]["fgsm"] <= 1 and row["num_examples"] == 8
        assert row["w_robust"]["fgsm"] == (row["accuracy"]["clean"] + row["accuracy"]["fgsm"]) / 2
        assert row["train_seconds"] > 0 and os.path.isfile(row["path"])
        for attack, (low, high) in row["ci95"].items():
            assert row["ci95"][attack] == pytest.approx(
                list(stats.wilson_interval(round(8 * row["accuracy"][attack]), 8)))
            assert low <= row["accuracy"][attack] <= high
    assert comparison["w_robust_attack"] == "fgsm"
    assert comparison["seeds"] == [0] and comparison["recipe"]["name"] == "equal"
    assert comparison["significance"]["baseline"] == "b_mtard"
    assert comparison["significance"]["attacks"] == ["clean", "fgsm"]
    students = tmp_path / "run" / "students"
    for row in rows[2:]:
        assert list(row["seeds"]) == ["0"] and row["recipe"]["name"] == "equal"
        assert row["seeds"]["0"]["model_dir"] == str(students / row["name"])
        if row["name"] != "rslad@kl10":
            assert row["variant"] is None and "vs_base" not in row and "vs_base" not in row["seeds"]["0"]
        if row["name"] == "b_mtard":
            assert "vs_b_mtard" not in row and "vs_b_mtard" not in row["seeds"]["0"]
            continue
        assert row["vs_b_mtard"] == row["seeds"]["0"]["vs_b_mtard"] == recomputed_tests(
            students / row["name"] / "eval", students / "b_mtard" / "eval", ["clean", "fgsm"])
        for test in row["vs_b_mtard"].values():
            assert 0 < test["p_value"] <= 1 and test["n"] == 8
    variant = rows[-1]
    assert variant["method"] == "rslad" and variant["variant"] == {
        "name": "kl10", "file": os.path.join(ROOT, "flags", "variants", "kl10.cfg"), "overrides": {"kl_scale": 10.0}}
    assert comparison["variant_dir"] == os.path.join(ROOT, "flags", "variants")
    assert variant["vs_base"] == variant["seeds"]["0"]["vs_base"] == recomputed_tests(
        students / "rslad@kl10" / "eval", students / "rslad" / "eval", ["clean", "fgsm"])
    for entry, method, kl_scale in (("rslad", "rslad", 1.0), ("rslad@kl10", "rslad", 10.0)):
        with open(students / entry / "student.json") as f:
            summary = json.load(f)
        assert (summary["method"], summary["config"]["balance"]["kl_scale"]) == (method, kl_scale)

    markdown = (tmp_path / "run" / "comparison.md").read_text()
    assert "| Model | Method | Clean | FGSM | W-Robust |" in markdown
    assert "| Student (resnet56:depth=8,width=2) | RSLAD |" in markdown
    assert "| Teacher (wrn34_10:depth=10,widen=1) | TRADES |" in markdown
    clean = rows[3]["accuracy"]["clean"]
    low, high = rows[3]["ci95"]["clean"]
    assert re.search(rf"\| Student \(resnet56:depth=8,width=2\) \| RSLAD \| (\*\*)?{100 * clean:.2f} "
                     rf"\[{100 * low:.1f}, {100 * high:.1f}\](\*\*)? \|", markdown)
    assert "Bold**: differs from B-MTARD at p < 0.05 (two-sided exact McNemar test" in markdown
    assert "## Paired differences to B-MTARD" in markdown and "(recipe: equal)" in markdown
    assert "| RSLAD @kl10 | " in markdown.split("## Paired differences to B-MTARD")[1]
    assert "## Paired differences of the variants to their methods" in markdown
    assert "Variants (their flags on top of the run's):\n\n- RSLAD @kl10 (kl10.cfg): kl_scale=10.0\n" in markdown
    assert check_bold_marks_significance(comparison) == markdown
    significant = copy.deepcopy(comparison)  # made-up significant differences are marked, and only they
    significant["rows"][2]["vs_b_mtard"]["fgsm"]["p_value"] = 0.001
    for row in significant["rows"][3:]:
        row.get("vs_b_mtard", {}).get("fgsm", {})["p_value"] = 0.5
    significant["rows"][-1]["vs_base"]["clean"]["p_value"] = 0.001
    significant["rows"][-1]["vs_base"]["fgsm"]["p_value"] = 0.5
    markdown = check_bold_marks_significance(significant)
    assert table_row(markdown, "| Student (resnet56:depth=8,width=2) | SAT |")[3].startswith("**")
    assert table_row(markdown, "| Student (resnet56:depth=8,width=2) | RSLAD @kl10 |")[2].endswith(" †")
    assert "†: a variant that differs from its own method's row at p < 0.05" in markdown
    assert (tmp_path / "run" / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [name for name in os.listdir(tmp_path / "run") if name.startswith(".")]
    capsys.readouterr()

    # A report without per-image flags (written before they existed) is evaluated again; nothing else is.
    os.remove(students / "sat" / "eval" / "per_image.npz")
    again = reproduce.reproduce(config, ENTRIES, strategies[1])
    out = capsys.readouterr().out
    after = outputs(config.runtime.model_dir)
    assert after.pop("students/sat/eval/report.json") > before.pop("students/sat/eval/report.json")
    assert after == before  # nothing else trained or evaluated again
    assert (students / "sat" / "eval" / "per_image.npz").exists()
    assert again["rows"][2]["vs_b_mtard"] == rows[2]["vs_b_mtard"]
    assert out.count("student: using") == len(ENTRIES)
    assert "clean teacher: using" in out and "robust teacher: using" in out
    assert [row["accuracy"] for row in again["rows"]] == [row["accuracy"] for row in rows]


def test_bad_methods_flag_is_one_clear_error(tmp_path):
    for methods in ("sat,madry", "sat,sat", "sat,sat@kl10,sat@kl10", "madry@kl10", "sat@../kl10"):
        result = subprocess.run([sys.executable, "-m", "mtard_tf.reproduce", f"--methods={methods}",
                                 f"--model_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, PYTHONPATH=ROOT))
        assert result.returncode != 0
        assert ("--methods must be distinct names from natural,sat,trades,ard,rslad,adaad,mtard,b_mtard, each alone "
                "or as METHOD@VARIANT") in result.stderr, methods
        assert "Traceback" not in result.stderr
    # A variant without its file: one line naming the file, before the run's directory is touched.
    result = subprocess.run([sys.executable, "-m", "mtard_tf.reproduce", "--methods=sat,sat@kl100",
                             f"--model_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --methods: no variant 'kl100' ({os.path.join(ROOT, 'flags', 'variants', 'kl100.cfg')} does not "
        "exist; give --variant_dir, or write the file)"]
    assert not (tmp_path / "run").exists()


def test_unavailable_dataset_is_one_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mtard_tf.reproduce", "--dataset=no_such_dataset",
                             f"--model_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 1
    assert "unknown tensorflow-datasets dataset 'no_such_dataset'" in result.stderr
    assert "Traceback" not in result.stderr


def test_seeds_give_mean_std_and_per_seed_tests(mock_cifar, strategies, teacher_files, tmp_path):
    config = config_lib.make(model_dir=str(tmp_path / "run"), clean_teacher=teacher_files[0],
                             robust_teacher=teacher_files[1], **EVAL, **TINY)
    comparison = reproduce.reproduce(config, ("sat", "b_mtard"), strategies[1], seeds=(0, 1))
    with open(tmp_path / "run" / "comparison.json") as f:
        assert json.load(f) == comparison
    assert comparison["seeds"] == [0, 1] and comparison["seed"] == 0
    students = tmp_path / "run" / "students"
    for row in comparison["rows"][2:]:
        assert list(row["seeds"]) == ["0", "1"] and "vs_b_mtard" not in row and "ci95" not in row
        for seed, run in row["seeds"].items():
            eval_dir = students / row["method"] / f"seed{seed}" / "eval"
            assert run["model_dir"] == str(students / row["method"] / f"seed{seed}")
            with open(eval_dir / "report.json") as f:
                assert json.load(f)["seed"] == int(seed)  # the attacks' noise follows the student's seed too
            if row["method"] == "sat":
                assert run["vs_b_mtard"] == recomputed_tests(eval_dir, students / "b_mtard" / f"seed{seed}" / "eval",
                                                             ["clean", "fgsm"])
        for attack in ("clean", "fgsm"):
            values = [run["accuracy"][attack] for run in row["seeds"].values()]
            assert row["mean"]["accuracy"][attack] == row["accuracy"][attack] == pytest.approx(np.mean(values))
            assert row["std"]["accuracy"][attack] == pytest.approx(np.std(values, ddof=1))
        assert row["w_robust"]["fgsm"] == pytest.approx((row["accuracy"]["clean"] + row["accuracy"]["fgsm"]) / 2)
    assert not os.path.exists(students / "sat" / "student.keras")  # several seeds: a seed level

    markdown = (tmp_path / "run" / "comparison.md").read_text()
    sat = comparison["rows"][2]
    assert (f"| Student (resnet56:depth=8,width=2) | SAT | {100 * sat['mean']['accuracy']['clean']:.2f} ± "
            f"{100 * sat['std']['accuracy']['clean']:.2f} |") in markdown
    assert "## Per seed" in markdown and "| Seed | Method | Clean | FGSM | W-Robust |" in markdown
    for seed in (0, 1):
        assert f"| {seed} | SAT | " in markdown and f"| {seed} | B-MTARD | " in markdown
    assert "mean ± sample standard deviation over 2 seeds" in markdown


RECIPES = {"sat.cfg": "# SAT's reference: 150 epochs\n\n--epochs=150\n--milestones=100\n--learning_rate=0.05\n"
                      "--epsilon=0.02\n",
           "b_mtard.cfg": "--epochs=300\n--milestones=215,260,285\n--kl_scale=2\n"}


def write_recipes(directory, recipes=RECIPES):
    os.makedirs(directory, exist_ok=True)
    for name, text in recipes.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    return str(directory)


def test_reference_recipe_scales_the_schedule(mock_cifar, strategies, teacher_files, tmp_path, capsys):
    config = config_lib.make(model_dir=str(tmp_path / "run"), clean_teacher=teacher_files[0],
                             robust_teacher=teacher_files[1], **EVAL, **{**TINY, "epochs": 2})
    recipe_dir = write_recipes(tmp_path / "recipes")
    comparison = reproduce.reproduce(config, ("sat", "b_mtard"), strategies[1], recipe="reference",
                                     recipe_dir=recipe_dir)
    assert comparison["recipe"] == {"name": "reference", "dir": recipe_dir, "reference_epochs": 300}
    sat, b_mtard = comparison["rows"][2:]
    # 150 reference epochs x 2/300 = 1 epoch (its milestone 100 -> round(0.67) = 1 is not < 1 epoch: dropped).
    assert sat["recipe"] == {"name": "reference", "file": os.path.join(recipe_dir, "sat.cfg"), "scale": 2 / 300,
                             "overrides": {"epochs": 150, "milestones": [100], "learning_rate": 0.05, "epsilon": 0.02},
                             "applied": {"epochs": 1, "milestones": [], "learning_rate": 0.05, "epsilon": 0.02}}
    assert b_mtard["recipe"]["applied"] == {"epochs": 2, "milestones": [1], "kl_scale": 2.0}
    assert sat["seeds"]["0"]["epochs"] == 1 and b_mtard["seeds"]["0"]["epochs"] == 2
    students = tmp_path / "run" / "students-reference"
    for method, steps in (("sat", 1), ("b_mtard", 2)):  # one step per epoch in TINY
        assert tf.train.latest_checkpoint(str(students / method / "checkpoints")).endswith(f"-{steps}")
        with open(students / method / "eval" / "report.json") as f:
            assert json.load(f)["epsilon"] == config.attack.epsilon  # trained at its recipe's radius, evaluated at the run's
    assert not os.path.exists(tmp_path / "run" / "students")  # equal and reference runs never share a student
    markdown = (tmp_path / "run" / "comparison.md").read_text()
    assert "# Student training methods compared, cifar10 (recipe: reference)" in markdown
    assert "- SAT (sat.cfg): epsilon=0.02, epochs=1, learning_rate=0.05, milestones=none" in markdown
    assert "- B-MTARD (b_mtard.cfg): epochs=2, milestones=1, kl_scale=2.0" in markdown

    # A selected checkpoint (student.json "selection", written by training) is reported; the rest is reused.
    selection = {"mode": "best_test", "epoch": 1, "metric": 0.4, "split": "test",
                 "metric_name": "(clean + PGD-TRADES-20) / 2"}
    with open(students / "sat" / "student.json") as f:
        summary = json.load(f)
    files.write_json(str(students / "sat" / "student.json"), {**summary, "selection": selection})
    capsys.readouterr()
    again = reproduce.reproduce(config, ("sat", "b_mtard"), strategies[1], recipe="reference",
                                recipe_dir=recipe_dir)
    assert capsys.readouterr().out.count("student: using") == 2
    assert again["rows"][2]["selection"] == again["rows"][2]["seeds"]["0"]["selection"] == selection
    with open(students / "b_mtard" / "student.json") as f:
        assert again["rows"][3].get("selection") == json.load(f).get("selection")  # whatever training recorded
    markdown = (tmp_path / "run" / "comparison.md").read_text()
    assert ("Model selection: best_test (clean + PGD-TRADES-20) / 2 on the test split (SAT epoch 1) — test-selected "
            "numbers are optimistic." in markdown)


def test_recipe_files_are_checked(tmp_path):
    config = config_lib.make(epochs=30, milestones=(20, 25))
    recipe_dir = write_recipes(tmp_path, {
        "sat.cfg": "--epochs=120\n--attack_step_size=0.01\n--jit_compile=false\n--steps_per_epoch=5\n",
        "trades.cfg": "# comment\n\n--epochs=100\n--learning_rte=0.1\n",
        "ard.cfg": "--seed=3\n", "rslad.cfg": "--epochs=ten\n", "adaad.cfg": "epochs 10\n"})
    overrides, record = reproduce.method_recipe(config, "sat", "reference", recipe_dir)
    # No recipe milestones: the run's (20, 25 of 30 epochs) stretched to the method's 12 epochs.
    assert overrides == {"epochs": 12, "milestones": (8, 10), "attack_step_size": 0.01, "jit_compile": "false",
                         "steps_per_epoch": 5}
    assert record["overrides"]["epochs"] == 120 and record["scale"] == 0.1
    assert reproduce.method_recipe(config, "sat", "equal", recipe_dir) == (
        {}, {"name": "equal", "file": None, "overrides": {}, "applied": {}})
    for method, message in (("trades", r"trades\.cfg: Unknown command line flag 'learning_rte'"),
                            ("ard", r"ard\.cfg: --seed cannot be part of a method's recipe"),
                            ("rslad", r"rslad\.cfg: flag --epochs=ten"),
                            ("adaad", r"adaad\.cfg: expected --name=value"),
                            ("natural", r"no recipe for method 'natural'")):
        with pytest.raises(config_lib.ConfigError, match=message):
            reproduce.method_recipe(config, method, "reference", recipe_dir)
    assert reproduce.scale_schedule(config_lib.make(epochs=5), {"epochs": 300, "milestones": (215, 260, 285)}) \
        == (5, (4,))
    assert reproduce.scale_schedule(config_lib.make(epochs=300), {"epochs": 200, "milestones": (100, 150)}) \
        == (200, (100, 150))
    assert reproduce.scale_schedule(config_lib.make(epochs=1), {"epochs": 100}) == (1, ())


def test_variant_files_are_checked(tmp_path):
    variant_dir = write_recipes(tmp_path / "variants", {
        "kl10.cfg": "# loss scale\n--kl_scale=10\n", "short.cfg": "--epochs=1\n--milestones=\n",
        "strong.cfg": "--robust_teacher_epochs=12\n", "images.cfg": "--num_eval_examples=100\n",
        "seeded.cfg": "--seed=3\n", "hot.cfg": "--temperature_min=20\n"})
    recipe_dir = write_recipes(tmp_path / "recipes")
    config = config_lib.make(epochs=30, milestones=(20, 25))
    # Equal recipe: the variant's flags alone; reference: on top of the method's scaled recipe, as written.
    entries = reproduce.parse_methods(["b_mtard", "b_mtard@kl10", "sat@short"])
    assert entries == [("b_mtard", None), ("b_mtard", "kl10"), ("sat", "short")]
    settings = reproduce.entry_settings(config, entries, "equal", None, variant_dir)
    assert settings["b_mtard"] == ({}, {"name": "equal", "file": None, "overrides": {}, "applied": {}}, None)
    assert settings["b_mtard@kl10"][0] == {"kl_scale": 10.0}
    assert settings["b_mtard@kl10"][2] == {"name": "kl10", "file": os.path.join(variant_dir, "kl10.cfg"),
                                           "overrides": {"kl_scale": 10.0}}
    settings = reproduce.entry_settings(config, entries, "reference", recipe_dir, variant_dir)
    assert settings["b_mtard"][0] == {"epochs": 30, "milestones": (22, 26, 28), "kl_scale": 2.0}
    assert settings["b_mtard@kl10"][0] == {"epochs": 30, "milestones": (22, 26, 28), "kl_scale": 10.0}
    assert settings["sat@short"][0] == {"epochs": 1, "milestones": (), "learning_rate": 0.05, "epsilon": 0.02}
    assert reproduce.student_dir("run", "b_mtard", "reference", 2, "kl10") == os.path.join(
        "run", "students-reference", "b_mtard@kl10", "seed2")
    missing = re.escape(os.path.join(variant_dir, "kl100.cfg"))
    for entry, message in (("sat@kl100", rf"no variant 'kl100' \({missing} does not exist"),
                           ("sat@strong", r"strong\.cfg: --robust_teacher_epochs cannot be part of a method's "
                                          r"variant \(reproduce sets the teachers"),
                           ("sat@images", r"images\.cfg: --num_eval_examples cannot be part of a method's variant"),
                           ("sat@seeded", r"seeded\.cfg: --seed cannot be part of a method's variant"),
                           ("b_mtard@hot", r"--methods entry b_mtard@hot: --temperature_min must not exceed")):
        with pytest.raises(config_lib.ConfigError, match=message):
            reproduce.entry_settings(config, reproduce.parse_methods([entry]), "equal", None, variant_dir)
    for entries, message in ((["sat", "sat"], "'sat' is given twice"), (["sat@kl10", "sat@kl10"], "given twice"),
                             (["madry@kl10"], "unknown method 'madry'"), (["sat@"], "names no variant file"),
                             (["sat@a/b"], "names no variant file")):
        with pytest.raises(config_lib.ConfigError, match=message):
            reproduce.parse_methods(entries)
    with pytest.raises(config_lib.ConfigError, match="no variant 'kl100'"):  # before anything trains
        reproduce.reproduce(config, ("sat", "sat@kl100"), None, variant_dir=variant_dir)
    # The repository's variants: each opens with a comment on what it varies, and reads.
    shipped = sorted(os.listdir(reproduce.VARIANT_DIR))
    assert {"kl10.cfg", "long.cfg"} <= set(shipped)
    for name in shipped:
        with open(os.path.join(reproduce.VARIANT_DIR, name)) as f:
            assert f.readline().startswith("# ")
        assert reproduce.method_variant(name[:-len(".cfg")])[0]
    assert reproduce.method_variant("long")[0] == {"epochs": 9, "milestones": (6,)}


def test_seeds_and_recipe_flags_reach_reproduce(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(reproduce, "_run", lambda *args: calls.append(args))
    monkeypatch.setattr(reproduce.startup, "run_command", lambda make_config, body, verbose: body(make_config()))
    reproduce.define_flags()
    recipe_dir = write_recipes(tmp_path)
    variant_dir = write_recipes(tmp_path / "variants", {"kl10.cfg": "--kl_scale=10\n"})
    try:
        flags.FLAGS(["reproduce", "--seeds=2,0", "--recipe=reference", f"--recipe_dir={recipe_dir}",
                     "--methods=sat,b_mtard,b_mtard@kl10", f"--variant_dir={variant_dir}", "--seed=5",
                     f"--model_dir={tmp_path}"])
        reproduce.main(["reproduce"])
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["reproduce", f"--model_dir={tmp_path}"])
        reproduce.main(["reproduce"])
        for bad in ("--seeds=1,1", "--seeds=a", "--recipe=papers", "--methods=sat,sat", "--methods=sat@",
                    "--methods=madry@kl10"):
            flags.FLAGS.unparse_flags()
            with pytest.raises(flags.IllegalFlagValueError):
                flags.FLAGS(["reproduce", bad])
    finally:
        flags.FLAGS.unparse_flags()
    config, methods, seeds, recipe, recipe_dir, variants = calls[0]
    assert (config.runtime.seed, methods) == (5, ("sat", "b_mtard", "b_mtard@kl10"))
    assert (seeds, recipe, recipe_dir, variants) == ((2, 0), "reference", str(tmp_path), variant_dir)
    assert calls[1][2:] == (None, "equal", None, None)
