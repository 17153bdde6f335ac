"""Tests of mtard_tf.evaluation.robustness: the report files, their fields, TensorBoard scalars and the sanity check."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import keras
from absl import logging
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtard_tf.evaluation import robustness, stats

EPS = 8.0 / 255.0
NUM_CLASSES = 10
# Reduced AutoAttack budgets: these tests are about the report, test_autoattack.py about the attacks.
SMALL_AUTOATTACK = {"autoattack": dict(apgd_steps=5, fab_steps=5, square_queries=50, n_target_classes=2)}


def make_data(n, seed, size=8, amp=0.15, noise=0.2):
    templates = 0.5 + amp * np.random.default_rng(123).uniform(-1, 1, (NUM_CLASSES, size, size, 3))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    x = np.clip(templates[y] + rng.normal(0, noise, (n, size, size, 3)), 0, 1).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    x, y = make_data(1000, seed=1)
    net = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                            keras.layers.Flatten(), keras.layers.Dense(NUM_CLASSES)])
    net.compile(optimizer=keras.optimizers.Adam(3e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    net.fit(x, y, epochs=3, batch_size=64, verbose=0)
    return net


def test_evaluate_writes_the_reports(model, tmp_path):
    x, y = make_data(50, seed=6)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    writer = tf.summary.create_file_writer(str(tmp_path / "tb"))
    output_dir = tmp_path / "eval"
    report = robustness.evaluate(model, dataset, attacks="clean,fgsm,pgd_sat,pgd_trades,cw,autoattack",
                                 epsilon=EPS, num_examples=40, batch_size=16, seed=0, output_dir=str(output_dir),
                                 summary_writer=writer, progress=False, step=3, attack_options=SMALL_AUTOATTACK)

    with open(output_dir / "report.json") as f:
        saved = json.load(f)
    flags, labels = robustness.read_per_image(str(output_dir))
    assert list(report["robust_flags"]) == list(flags) and list(report["labels"]) == list(labels)
    for name, robust in flags.items():
        np.testing.assert_array_equal(report["robust_flags"][name], robust)
    assert saved == json.loads(json.dumps({k: v for k, v in report.items() if k not in ("robust_flags", "labels")}))
    assert list(saved["attacks"]) == ["clean", "fgsm", "pgd_sat", "pgd_trades", "cw", "autoattack"]
    clean = saved["attacks"]["clean"]["accuracy"]
    for name, r in saved["attacks"].items():
        assert {"accuracy", "w_robust", "num_examples", "num_correct", "seconds"} <= set(r), name
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["num_examples"] == 40
        assert r["num_correct"] == round(r["accuracy"] * 40)
        assert r["w_robust"] == pytest.approx((clean + r["accuracy"]) / 2)
        assert r["seconds"] >= 0.0
        assert r["valid"] and r["max_perturbation"] <= EPS + 1e-6
        assert r["ci95"] == pytest.approx(list(stats.wilson_interval(r["num_correct"], 40)))
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
    accuracies = [saved["attacks"][n]["accuracy"] for n in ("clean", "pgd_sat", "autoattack")]
    assert accuracies == sorted(accuracies, reverse=True)
    assert saved["attacks"]["clean"]["max_perturbation"] == 0.0
    assert {"passed", "violations", "checks"} <= set(saved["sanity"])
    assert saved["num_examples"] == 40 and saved["epsilon"] == pytest.approx(EPS)
    assert not [p for p in os.listdir(output_dir) if p.endswith(".tmp") or p.startswith(".")]

    assert saved["per_image"] == "per_image.npz"
    with np.load(output_dir / "per_image.npz") as per_image:
        assert sorted(per_image.files) == sorted([*saved["attacks"], "labels"])
        np.testing.assert_array_equal(per_image["labels"], y[:40])
        for name, r in saved["attacks"].items():
            assert per_image[name].dtype == bool and per_image[name].shape == (40,)
            assert per_image[name].mean() == r["accuracy"] and per_image[name].sum() == r["num_correct"]
    flags, labels = robustness.read_per_image(str(output_dir))
    assert list(flags) == list(saved["attacks"]) and list(labels) == list(y[:40])
    os.remove(output_dir / "per_image.npz")
    with pytest.raises(FileNotFoundError, match="re-run the evaluation"):
        robustness.read_per_image(str(output_dir))

    markdown = (output_dir / "report.md").read_text()
    assert "| Attack | Accuracy (%) | W-Robust (%) | Time (s) |" in markdown
    for display in ("Clean", "FGSM", "PGD-SAT", "PGD-TRADES", "CW∞", "AutoAttack"):
        assert f"| {display} | " in markdown
    low, high = saved["attacks"]["clean"]["ci95"]
    assert f"| Clean | {100 * clean:.2f} [{100 * low:.1f}, {100 * high:.1f}] | {100 * clean:.2f} |" in markdown
    assert "95% Wilson confidence interval" in markdown

    accumulator = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["tensors"])
    for name in saved["attacks"]:
        assert {f"eval/{name}_accuracy", f"eval/{name}_w_robust", f"eval/{name}_seconds"} <= tags
    event = accumulator.Tensors("eval/pgd_sat_accuracy")[-1]
    assert event.step == 3
    assert float(tf.make_ndarray(event.tensor_proto)) == pytest.approx(saved["attacks"]["pgd_sat"]["accuracy"])


def test_evaluate_repeats_with_a_seed_and_takes_the_first_examples(model, tmp_path):
    x, y = make_data(30, seed=7)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    runs = [robustness.evaluate(model, dataset, attacks=["pgd_sat", "cw"], epsilon=EPS, batch_size=8, seed=5,
                                output_dir=str(tmp_path / f"run{i}"), progress=i == 0) for i in range(2)]
    assert list(runs[0]["attacks"]) == ["clean", "pgd_sat", "cw"]  # clean is always there, for W-Robust
    for name in runs[0]["attacks"]:
        assert runs[0]["attacks"][name]["num_correct"] == runs[1]["attacks"][name]["num_correct"]
    assert runs[0]["num_examples"] == 30
    clean = np.mean(np.argmax(model(x[:30], training=False), -1) == y[:30])
    assert runs[0]["attacks"]["clean"]["accuracy"] == pytest.approx(clean)


def test_take_examples_batches_and_scales():
    x = (np.arange(5 * 2 * 2 * 3) % 256).astype(np.uint8).reshape(5, 2, 2, 3)
    y = np.arange(5)
    images, labels = robustness.take_examples(tf.data.Dataset.from_tensor_slices((x, y)), 3)
    assert images.shape == (3, 2, 2, 3) and images.dtype == np.float32
    np.testing.assert_allclose(images, x[:3] / 255.0)
    np.testing.assert_array_equal(labels, [0, 1, 2])
    images, labels = robustness.take_examples(tf.data.Dataset.from_tensor_slices((x / 255.0, y)).batch(2), None)
    assert images.shape == (5, 2, 2, 3) and list(labels) == [0, 1, 2, 3, 4]


def test_parse_attacks():
    assert robustness.parse_attacks("autoattack, fgsm") == ("clean", "fgsm", "autoattack")
    assert robustness.parse_attacks(robustness.ATTACK_NAMES) == robustness.ATTACK_NAMES
    with pytest.raises(ValueError):
        robustness.parse_attacks("pgd")


def test_sanity_check_flags_violations(monkeypatch, tmp_path):
    correct = {
        "clean": np.array([True, True, False, True]),
        "pgd_sat": np.array([True, False, True, False]),  # image 2: PGD-robust but clean-wrong
        "autoattack": np.array([True, True, False, False]),  # image 1: AutoAttack-robust but PGD broke it
    }
    sanity = robustness.sanity_check(correct)
    assert not sanity["passed"] and sanity["violations"] == 2
    by_pair = {(c["robust_under"], c["implies_correct_under"]): c for c in sanity["checks"]}
    assert by_pair[("pgd_sat", "clean")]["examples"] == [2]
    assert by_pair[("autoattack", "pgd_sat")]["examples"] == [1]
    assert by_pair[("autoattack", "clean")]["violations"] == 0
    assert robustness.sanity_check({k: correct["clean"] for k in correct})["passed"]

    # evaluate() prints the violations as warnings: a "defence" that only looks robust to FGSM.
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    monkeypatch.setitem(robustness.ATTACKS, "fgsm", lambda model, x, y, **kw: tf.convert_to_tensor(x))
    monkeypatch.setitem(robustness.ATTACKS, "autoattack",
                        lambda model, x, y, epsilon, **kw: tf.clip_by_value(x + epsilon, 0.0, 1.0))
    x = np.full((4, 2, 2, 1), 0.5, np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(4, np.int32))).batch(4)

    def fragile(inputs, training=False):  # correct on the clean images, wrong after any shift of the pixels
        shift = tf.reduce_max(tf.abs(tf.reshape(inputs, [tf.shape(inputs)[0], -1]) - 0.5), axis=1)
        return tf.stack([1.0 - 100.0 * shift, tf.fill(tf.shape(shift), 0.5)], axis=1)

    report = robustness.evaluate(fragile, dataset, attacks="fgsm,autoattack", epsilon=EPS, batch_size=4,
                                 output_dir=str(tmp_path), progress=False)
    assert report["attacks"]["fgsm"]["accuracy"] == 1.0 and report["attacks"]["autoattack"]["accuracy"] == 0.0
    assert report["sanity"]["passed"]  # FGSM weaker than AutoAttack: fine

    monkeypatch.setitem(robustness.ATTACKS, "fgsm",
                        lambda model, x, y, epsilon, **kw: tf.clip_by_value(x - epsilon, 0.0, 1.0))
    monkeypatch.setitem(robustness.ATTACKS, "autoattack", lambda model, x, y, **kw: tf.convert_to_tensor(x))
    report = robustness.evaluate(fragile, dataset, attacks="fgsm,autoattack", epsilon=EPS, batch_size=4,
                                 output_dir=str(tmp_path), progress=False)
    assert report["sanity"]["violations"] == 4
    assert any("robust under autoattack but broken by fgsm" in w for w in warnings)


def test_an_attack_that_fixes_a_misclassified_image_is_not_robustness(monkeypatch, tmp_path):
    monkeypatch.setitem(robustness.ATTACKS, "fgsm",
                        lambda model, x, y, epsilon, **kw: tf.clip_by_value(x + epsilon, 0.0, 1.0))
    x = np.full((4, 2, 2, 1), 0.5, np.float32)
    labels = np.array([0, 0, 1, 1], np.int32)

    def shift_detector(inputs, training=False):  # class 0 for the clean images, class 1 once the pixels moved
        shift = tf.reduce_max(tf.abs(tf.reshape(inputs, [tf.shape(inputs)[0], -1]) - 0.5), axis=1)
        return tf.stack([1.0 - 100.0 * shift, tf.fill(tf.shape(shift), 0.5)], axis=1)

    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(4)
    report = robustness.evaluate(shift_detector, dataset, attacks="fgsm", epsilon=EPS, batch_size=4,
                                 output_dir=str(tmp_path), progress=False)
    # Images 2 and 3 are misclassified clean and "correct" after FGSM: neither is robust. Images 0, 1 are broken.
    assert report["attacks"]["clean"]["accuracy"] == 0.5
    assert report["attacks"]["fgsm"]["accuracy"] == 0.0
    assert report["sanity"]["passed"]


def test_per_class_accuracy_counts_each_class_on_its_own_images():
    from mtard_tf.evaluation import robustness
    labels = np.array([0, 1, 1, 2, 2, 2])
    correct = {"clean": np.array([1, 1, 0, 1, 1, 0], bool), "pgd_sat": np.array([0, 1, 0, 1, 0, 0], bool)}
    per_class = robustness.per_class_accuracy(correct, labels, ["a", "b", "c", "d"])
    assert per_class == {"class_names": ["a", "b", "c", "d"], "num_examples": [1, 2, 3, 0],
                         "accuracy": {"clean": [1.0, 0.5, 2 / 3, None], "pgd_sat": [0.0, 0.5, 1 / 3, None]}}
    markdown = robustness.format_markdown({"epsilon": 8 / 255, "num_examples": 6, "seed": 0, "attacks": {},
                                           "per_class": per_class})
    assert "| c | 3 | 66.67 | 33.33 |" in markdown and "| d | 0 | – | – |" in markdown
