"""python -m mtard_tf.tools.factor_tables: a factor study's tables from evaluation files the test writes itself, so
that every interval and p-value below is worked out by hand; a spec pairing evaluations of other images is one
error line."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mtard_tf.errors import UserError
from mtard_tf.evaluation import robustness
from mtard_tf.tools import factor_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 20
LABELS = np.arange(N) % 10
Z = 1.959963984540054  # the standard normal's 97.5% quantile


def flags(*ranges):
    """Per-image flags of N images, True on the images of the given ranges."""
    out = np.zeros(N, dtype=bool)
    for begin, end in ranges:
        out[begin:end] = True
    return out


# The baseline gets images 0-9 right (10/20) and is robust under AutoAttack on 0-3 (4/20). The variant loses image
# 9 and gains 10-15 clean (15/20: 6 images only it gets right, 1 only the baseline), and is robust on 0-3 and 10-15
# (10/20: 6 vs 0). PGD-TRADES (weaker, not reported) equals AutoAttack.
BASELINE = {"clean": flags((0, 10)), "pgd_trades": flags((0, 4)), "autoattack": flags((0, 4))}
VARIANT = {"clean": flags((0, 9), (10, 16)), "pgd_trades": flags((0, 4), (10, 16)),
           "autoattack": flags((0, 4), (10, 16))}


def wilson(k, n):
    """The Wilson score interval by its formula: (p + z²/2n ± z √(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    center, half = p + Z * Z / (2 * n), Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return [(center - half) / (1 + Z * Z / n), (center + half) / (1 + Z * Z / n)]


def write_evaluation(directory, correct, labels=LABELS, train_seconds=None):
    """report.json, report.md and per_image.npz as an evaluation writes them; student.json beside the eval
    directory when `train_seconds` is given."""
    os.makedirs(directory)
    report = {"attacks": {name: {"accuracy": float(f.mean()), "num_correct": int(f.sum()), "num_examples": N}
                          for name, f in correct.items()}, "num_examples": N, "per_image": robustness.PER_IMAGE_FILE}
    robustness.write_report(str(directory), report, correct, labels, "# report\n")
    if train_seconds is not None:
        with open(os.path.join(os.path.dirname(directory), "student.json"), "w") as f:
            json.dump({"method": "b_mtard", "train_seconds": train_seconds}, f)


def write_spec(path, rows, **factor):
    with open(path, "w") as f:
        json.dump({"title": "Small-budget factors",
                   "factors": [{"name": "loss scale", "question": "Does a larger KL scale help?", "rows": rows,
                                **factor}]}, f)
    return str(path)


ROW = {"label": "B-MTARD, kl_scale 10", "eval_dir": "kl10/students/b_mtard/eval",
       "baseline": "baseline/students/b_mtard/eval", "varies": "kl_scale 1 -> 10", "baseline_label": "B-MTARD"}


def test_tables_intervals_and_paired_tests(tmp_path):
    write_evaluation(tmp_path / "study" / "baseline" / "students" / "b_mtard" / "eval", BASELINE)
    write_evaluation(tmp_path / "study" / "kl10" / "students" / "b_mtard" / "eval", VARIANT, train_seconds=95.0)
    spec = write_spec(tmp_path / "study" / "spec.json", [ROW])
    result = factor_tables.factor_tables(spec, str(tmp_path / "out"))

    with open(tmp_path / "out" / "factors.json") as f:
        assert json.load(f) == result
    (factor,) = result["factors"]
    assert factor["attack"] == "autoattack" and factor["question"] == "Does a larger KL scale help?"
    (group,) = factor["groups"]
    baseline, (variant,) = group["baseline"], group["variants"]
    assert baseline["eval_dir"] == str(tmp_path / "study" / "baseline" / "students" / "b_mtard" / "eval")
    assert baseline["accuracy"] == {"clean": 0.5, "autoattack": 0.2} and baseline["w_robust"] == pytest.approx(0.35)
    assert variant["accuracy"] == {"clean": 0.75, "autoattack": 0.5} and variant["w_robust"] == pytest.approx(0.625)
    for evaluation, counts in ((baseline, (10, 4)), (variant, (15, 10))):
        for attack, k in zip(("clean", "autoattack"), counts):
            assert evaluation["ci95"][attack] == pytest.approx(wilson(k, N), abs=1e-9)
    assert wilson(10, N) == pytest.approx([0.2993, 0.7007], abs=1e-4)  # the formula's numbers, worked out
    # Exact McNemar: p = 2 P(X <= min(a, b)) for X ~ Binomial(a + b, 1/2): clean 6 vs 1 -> 2 (1 + 7) / 2^7,
    # AutoAttack 6 vs 0 -> 2 / 2^6.
    assert variant["vs_baseline"]["clean"] == {"difference": pytest.approx(0.25), "a_only": 6, "b_only": 1, "n": N,
                                               "p_value": pytest.approx(0.125)}
    assert variant["vs_baseline"]["autoattack"] == {"difference": pytest.approx(0.3), "a_only": 6, "b_only": 0,
                                                    "n": N, "p_value": pytest.approx(0.03125)}
    assert (variant["train_seconds"], baseline["train_seconds"]) == (95.0, None)

    markdown = (tmp_path / "out" / "factors.md").read_text()
    assert markdown.startswith("# Small-budget factors\n")
    assert "## loss scale\n\nDoes a larger KL scale help?\n\n20 test images; strongest attack: AutoAttack." in markdown
    assert ("| Model | Varies | Clean | AutoAttack | W-Robust | Δ Clean | Δ AutoAttack | Training |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|\n"
            "| B-MTARD | baseline | 50.00 [29.9, 70.1] | 20.00 [8.1, 41.6] | 35.00 | – | – | – |\n"
            "| B-MTARD, kl_scale 10 | kl_scale 1 -> 10 | 75.00 [53.1, 88.8] | 50.00 [29.9, 70.1] | 62.50 | "
            "+25.00 pp, p = 0.125 (6 vs 1) | **+30.00 pp, p = 0.031 (6 vs 0)** | 95 s |") in markdown
    assert (tmp_path / "out" / "factors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Every evaluation of a factor must have its strongest attack.
    write_evaluation(tmp_path / "study" / "pgd" / "eval", {"clean": VARIANT["clean"],
                                                            "pgd_trades": VARIANT["pgd_trades"]})
    spec = write_spec(tmp_path / "study" / "spec.json", [ROW, {**ROW, "eval_dir": "pgd/eval"}])
    with pytest.raises(UserError, match=r"pgd/eval has no AutoAttack evaluation, which factor 'loss scale' reports"):
        factor_tables.factor_tables(spec, str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()
    spec = write_spec(tmp_path / "study" / "spec.json", [{"label": "B-MTARD, kl_scale 10", "baseline": "b/eval"}])
    with pytest.raises(UserError, match=r'spec\.json, factor 1 \(loss scale\), row 1: needs "eval_dir", a non-empty'):
        factor_tables.factor_tables(spec, str(tmp_path / "out2"))


def test_evaluations_of_other_images_are_one_error_line(tmp_path):
    write_evaluation(tmp_path / "baseline" / "eval", BASELINE)
    write_evaluation(tmp_path / "kl10" / "eval", VARIANT, labels=(LABELS + 1) % 10)
    spec = write_spec(tmp_path / "spec.json", [{**ROW, "eval_dir": "kl10/eval", "baseline": "baseline/eval"}])
    result = subprocess.run([sys.executable, "-m", "mtard_tf.tools.factor_tables", f"--spec={spec}",
                             f"--output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert (f"the evaluations in {tmp_path / 'kl10' / 'eval'} and {tmp_path / 'baseline' / 'eval'} are not of the "
            "same test images") in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_study_in_progress_lists_the_rows_not_measured_yet(tmp_path):
    write_evaluation(tmp_path / "study" / "baseline" / "students" / "b_mtard" / "eval", BASELINE)
    write_evaluation(tmp_path / "study" / "kl10" / "students" / "b_mtard" / "eval", VARIANT)
    pending = {**ROW, "label": "RSLAD, kl_scale 10", "eval_dir": "kl10/students/rslad/eval"}
    spec = write_spec(tmp_path / "study" / "spec.json", [ROW, pending])
    with pytest.raises(UserError, match="rslad/eval/report.json does not exist"):  # a missing file is an error...
        factor_tables.factor_tables(spec, str(tmp_path / "out"))
    result = factor_tables.factor_tables(spec, str(tmp_path / "out"), allow_pending=True)  # ...unless allowed
    (factor,) = result["factors"]
    assert factor["pending"] == ["RSLAD, kl_scale 10"]
    assert [variant["label"] for variant in factor["groups"][0]["variants"]] == ["B-MTARD, kl_scale 10"]
    assert "Not measured yet: RSLAD, kl_scale 10." in (tmp_path / "out" / "factors.md").read_text()


def test_a_factor_marked_figure_false_is_tabled_but_not_drawn(tmp_path):
    write_evaluation(tmp_path / "study" / "baseline" / "students" / "b_mtard" / "eval", BASELINE)
    write_evaluation(tmp_path / "study" / "kl10" / "students" / "b_mtard" / "eval", VARIANT)
    spec = write_spec(tmp_path / "study" / "spec.json", [ROW], figure=False)
    result = factor_tables.factor_tables(spec, str(tmp_path / "out"))
    (factor,) = result["factors"]
    assert factor["figure"] is False and factor["groups"]  # in the tables...
    assert factor_tables.plotted_factors(result) == []  # ...not in the figure, which has nothing to draw
    assert "| B-MTARD, kl_scale 10 | kl_scale 1 -> 10 |" in (tmp_path / "out" / "factors.md").read_text()
    assert not (tmp_path / "out" / "factors.png").exists()
    result = factor_tables.factor_tables(write_spec(tmp_path / "study" / "spec.json", [ROW]), str(tmp_path / "out"))
    assert factor_tables.plotted_factors(result) == result["factors"] and (tmp_path / "out" / "factors.png").exists()
    factor_tables.factor_tables(write_spec(tmp_path / "study" / "spec.json", [ROW], figure=False),
                                str(tmp_path / "out"))
    assert not (tmp_path / "out" / "factors.png").exists()  # not left from the run before
    with pytest.raises(UserError, match=r'factor 1 \(loss scale\): "figure" must be true or false, not \'no\''):
        factor_tables.factor_tables(write_spec(tmp_path / "study" / "spec.json", [ROW], figure="no"),
                                    str(tmp_path / "out"))


def test_a_model_in_several_rows_is_labelled_once_in_the_figure(tmp_path):
    """The wide teacher of the study is the variant of two rows (against the preset's teacher and against SAT): one
    point, one label (the first row's), and an arrow from each baseline."""
    write_evaluation(tmp_path / "study" / "baseline" / "students" / "b_mtard" / "eval", BASELINE)
    write_evaluation(tmp_path / "study" / "kl10" / "students" / "b_mtard" / "eval", VARIANT)
    other = {"clean": flags((0, 12)), "pgd_trades": flags((0, 2)), "autoattack": flags((0, 2))}
    write_evaluation(tmp_path / "study" / "sat" / "eval", other)
    against_sat = {**ROW, "label": "B-MTARD, kl_scale 10 (vs SAT)", "baseline": "sat/eval", "baseline_label": "SAT"}
    result = factor_tables.factor_tables(write_spec(tmp_path / "study" / "spec.json", [ROW, against_sat]),
                                         str(tmp_path / "out"))
    (factor,) = factor_tables.plotted_factors(result)
    assert [len(group["variants"]) for group in factor["groups"]] == [1, 1]  # two arrows...
    assert factor_tables.point_labels(factor) == [  # ...between three points
        ("B-MTARD", (20.0, 50.0), "baseline"), ("B-MTARD, kl_scale 10", (50.0, 75.0), "variant"),
        ("SAT", (10.0, 60.0), "baseline")]
