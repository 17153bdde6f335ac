"""TFLite export (float32, float16, int8), the model card of both export formats, and the robustness evaluation of
a .tflite file (transfer and direct attacks, beside the float model)."""

import json
import os
import pathlib

import ai_edge_litert
import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert import interpreter as litert

from support import run_main, tiny_model
from mtard_tf import config as config_lib, files
from mtard_tf.export import saved_model, tflite
from mtard_tf.job import stages

NUM_CLASSES = 10
SIZE = 8
# float16 weights moved this model's logits (|z| < 2) by at most 6e-4; 0.02 leaves a wide margin.
FLOAT_TOLERANCE = {"none": 1e-4, "float16": 2e-2}


def template_data(n, seed):
    """Noisy copies of one fixed random template per class: a tiny conv net separates them after a few epochs, so
    its logits are well apart and top-1 agreement after quantisation is a meaningful check."""
    templates = 0.5 + 0.15 * np.random.default_rng(123).uniform(-1, 1, (NUM_CLASSES, SIZE, SIZE, 3))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    x = np.clip(templates[y] + rng.normal(0, 0.2, (n, SIZE, SIZE, 3)), 0, 1).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    x, y = template_data(1000, seed=1)
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(NUM_CLASSES)])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    return model


@pytest.mark.parametrize("quantize", ["none", "float16", "int8"])
def test_each_quantisation_exports_loads_and_agrees_with_keras(trained, tmp_path, quantize):
    calibration, _ = template_data(64, seed=2)
    card = {"note": "from the test"}
    path = tflite.export_tflite(trained, str(tmp_path), "edge", quantize, model_card=card,
                                representative_images=calibration if quantize == "int8" else None)
    assert path == str(tmp_path / "edge" / "1.tflite")
    assert os.listdir(tmp_path / "edge") == ["1.tflite"]  # no temporary file left

    deployed = tflite.TFLiteModel(path)
    # On LiteRT, the runtime edge users run, not TensorFlow's deprecated tf.lite.Interpreter (another class).
    assert type(deployed.interpreter) is litert.Interpreter
    assert type(deployed.interpreter).__module__ == "ai_edge_litert.interpreter"
    assert (deployed.image_shape, deployed.num_classes) == ((SIZE, SIZE, 3), NUM_CLASSES)
    x, _ = template_data(200, seed=3)
    expected = trained.predict(x, verbose=0)
    logits = deployed.logits(x)
    assert logits.shape == expected.shape and logits.dtype == np.float32
    if quantize == "int8":
        assert np.mean(logits.argmax(-1) == expected.argmax(-1)) >= 0.95
    else:
        np.testing.assert_allclose(logits, expected, atol=FLOAT_TOLERANCE[quantize], rtol=0)
    # As a callable the attack code queries: eager tensors and inside a tf.function, any batch size.
    np.testing.assert_array_equal(deployed(tf.constant(x[:3])).numpy(), logits[:3])
    np.testing.assert_array_equal(tf.function(deployed)(tf.constant(x[:5])).numpy(), logits[:5])

    read = tflite.read_model_card(path)
    assert read["note"] == "from the test"
    assert (read["format"], read["quantization"], read["model_name"], read["version"]) == ("tflite", quantize,
                                                                                          "edge", 1)
    assert read["input"] == {"name": "images", "dtype": "float32", "shape": [None, SIZE, SIZE, 3],
                             "range": [0.0, 1.0]}
    assert ("representative_examples" in read) == (quantize == "int8")


def test_versions_count_across_formats_and_a_failed_export_leaves_nothing(trained, tmp_path, monkeypatch):
    base = str(tmp_path)
    assert saved_model.export_model(trained, base, "m", [str(i) for i in range(NUM_CLASSES)],
                                    warmup_examples=0).endswith(os.path.join("m", "1"))
    assert tflite.export_tflite(trained, base, "m").endswith(os.path.join("m", "2.tflite"))
    class_names = [str(i) for i in range(NUM_CLASSES)]
    for exporter in (lambda: saved_model.export_model(trained, base, "m", class_names, version=2),
                     lambda: tflite.export_tflite(trained, base, "m", version=1)):
        with pytest.raises(saved_model.ExportError, match="already exists"):
            exporter()
    assert saved_model.next_version(os.path.join(base, "m")) == 3
    assert tflite.read_model_card(os.path.join(base, "m", "2.tflite")) is None  # no card asked for

    def fail(*args):
        raise RuntimeError("injected")
    monkeypatch.setattr(tflite, "with_metadata", fail)
    with pytest.raises(RuntimeError):
        tflite.export_tflite(trained, base, "m", model_card={})
    assert sorted(os.listdir(os.path.join(base, "m"))) == ["1", "2.tflite"]

    with pytest.raises(config_lib.ConfigError, match="--quantize applies to --format=tflite"):
        config_lib.make(quantize="int8")
    with pytest.raises(config_lib.ConfigError, match="--export_precision applies to --format=savedmodel"):
        config_lib.make(format="tflite", export_precision="mixed_float16")


def test_metadata_entries_are_added_and_replaced(trained):
    content = tflite.convert(trained)
    once = tflite.with_metadata(content, "model_card", b'{"a": 1}')
    twice = tflite.with_metadata(once, "model_card", b'{"a": 2}')
    assert tflite.read_metadata(content, "model_card") is None
    assert tflite.read_metadata(twice, "model_card") == b'{"a": 2}'
    assert tflite.read_metadata(twice, "CONVERSION_METADATA") == tflite.read_metadata(content, "CONVERSION_METADATA")


@pytest.fixture
def student_run(mock_cifar, tmp_path):
    """A run directory as training and evaluation leave it: student.keras, student.json (with the training's
    configuration), eval/report.json of that file."""
    keras.utils.set_random_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    student = str(run / "student.keras")
    tiny_model("student").save(student)
    trained_with = config_lib.make(method="rslad", epochs=7, seed=3, robust_teacher="/teachers/robust.keras")
    files.write_json(str(run / "student.json"), {"method": "rslad", "config": trained_with.to_dict(),
                                                 "selection": {"mode": "last", "epoch": 7}})
    accuracy = {"accuracy": 0.5, "ci95": [0.3, 0.7], "num_correct": 8, "num_examples": 16, "seconds": 1.0}
    files.write_json(str(run / "eval" / "report.json"), {
        "attacks": {"clean": accuracy, "autoattack": {**accuracy, "accuracy": 0.25, "num_correct": 4}},
        "epsilon": 8 / 255, "num_examples": 16, "model": {"sha256": stages.file_sha256(student)}})
    config = config_lib.make(model_dir=str(tmp_path / "elsewhere"), export_dir=str(tmp_path / "exported"),
                             num_eval_examples=8, eval_batch_size=4, square_queries=5, verbose=0)
    return config, student


def check_card(card, student):
    assert card["source_model"] == {"path": student, "sha256": stages.file_sha256(student)}
    assert len(card["class_names"]) == NUM_CLASSES
    training = card["training"]
    assert training["source"] == str(pathlib.Path(student).with_suffix(".json")) + " (the training run's configuration)"
    assert (training["method"], training["epochs"], training["seed"]) == ("rslad", 7, 3)
    assert training["teachers"] == {"robust": {"file": "/teachers/robust.keras", "arch": "wrn34_10",
                                               "method": "trades", "epochs": 100}}
    assert training["selection"] == {"mode": "last", "epoch": 7}
    evaluation = card["evaluation"]
    assert evaluation["sha256_checked"] and evaluation["num_examples"] == 16
    assert evaluation["attacks"]["autoattack"] == {"accuracy": 0.25, "ci95": [0.3, 0.7], "num_correct": 4,
                                                   "num_examples": 16}


def test_both_formats_carry_the_model_card(student_run):
    config, student = student_run
    saved_model = stages.export_stage(config, student, reuse=False)
    with open(os.path.join(saved_model, "assets.extra", "model_card.json")) as f:
        card = json.load(f)
    check_card(card, student)
    assert (card["format"], card["version"], card["precision"]) == ("savedmodel", 1, "float32")

    config = config_lib.replace(config, format="tflite", quantize="int8", representative_examples=8)
    path = stages.export_stage(config, student)
    assert path.endswith(os.path.join("mtard_student", "2.tflite"))
    card = tflite.read_model_card(path)
    check_card(card, student)
    assert (card["format"], card["quantization"], card["representative_examples"]) == ("tflite", "int8", 8)
    assert stages.export_stage(config, student) == path  # the same student in the same format: reused

    # An evaluation report of another file is not quoted.
    report = os.path.join(os.path.dirname(student), "eval", "report.json")
    files.write_json(report, {**json.load(open(report)), "model": {"sha256": "another file"}})
    assert stages.model_card(student, stages.file_sha256(student), ["a"])["evaluation"] is None


def test_tflite_evaluation_labels_transfer_and_direct_attacks(student_run, tmp_path, monkeypatch):
    config, student = student_run
    path = stages.export_stage(config_lib.replace(config, format="tflite"), student)

    def not_litert(*args, **kwargs):
        raise AssertionError("the evaluation ran on tf.lite.Interpreter, not on LiteRT")

    monkeypatch.setattr(tf.lite, "Interpreter", not_litert)
    with pytest.raises(config_lib.ConfigError, match="needs --source_model"):
        stages.evaluate_tflite_stage(config, path, str(tmp_path / "unused"))

    output_dir = tmp_path / "eval"
    report = stages.evaluate_tflite_stage(config_lib.replace(config, source_model=student), path, str(output_dir))
    assert json.loads((output_dir / "report.json").read_text()) == report
    kinds = {name: result["kind"] for name, result in report["attacks"].items()}
    assert kinds == {"clean": "direct", "pgd_sat": "transfer", "apgd_ce": "transfer", "square": "direct",
                     "worst_case": "per image"}
    assert report["attacks"]["square"]["queries"] == 5
    for result in report["attacks"].values():
        for figures in (result, result["source"]):
            assert figures["num_examples"] == 8 and figures["ci95"][0] <= figures["accuracy"] <= figures["ci95"][1]
        assert result.get("valid", True)
        # A float32 TFLite model is the Keras model: same images, same predictions.
        assert result["num_correct"] == result["source"]["num_correct"]
    assert report["deployed"]["bytes"] == os.path.getsize(path) and report["deployed"]["latency_ms"] > 0
    assert report["deployed"]["runtime"] == tflite.RUNTIME == f"LiteRT {ai_edge_litert.__version__}"
    assert report["source"]["matches_model_card"]
    with np.load(output_dir / "per_image.npz") as per_image:
        assert sorted(per_image.files) == sorted(["labels", *kinds, *(f"source_{name}" for name in kinds)])
        for prefix in ("", "source_"):
            every_attack = np.logical_and.reduce([per_image[prefix + name] for name in kinds if name != "worst_case"])
            np.testing.assert_array_equal(per_image[prefix + "worst_case"], every_attack)
        # Per class: the deployed model's flags on each class's images, every attack and the worst case.
        per_class, labels = report["per_class"], per_image["labels"]
        assert per_class["num_examples"] == [int((labels == k).sum()) for k in range(NUM_CLASSES)]
        assert sorted(per_class["accuracy"]) == sorted(kinds)
        for name in kinds:
            for k, accuracy in enumerate(per_class["accuracy"][name]):
                assert accuracy == (float(per_image[name][labels == k].mean()) if (labels == k).any() else None)
    markdown = (output_dir / "report.md").read_text()
    assert "| Attack | Kind | Deployed (%) | Float source (%) |" in markdown
    assert "| PGD-SAT | transfer |" in markdown and "| Square (5 queries) | direct |" in markdown
    assert f"ms per image ({tflite.RUNTIME}, median over" in markdown
    assert "| Class | Images | Clean (%) | PGD-SAT (%) |" in markdown
    assert markdown.count("\n| " + per_class["class_names"][0] + " | ") == 1


def test_missing_source_model_is_one_error_line(mock_metadata_dir, tmp_path):
    path = tmp_path / "1.tflite"
    path.write_bytes(b"unused: the flag is checked first")
    result = run_main(mock_metadata_dir, "--mode=evaluate", f"--model={path}", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: evaluating a .tflite model needs --source_model=PATH.keras, the float Keras student it "
                      "was converted from (the transfer attacks are crafted on it)"]
    assert "Traceback" not in result.stderr


def test_a_student_whose_training_recorded_no_configuration_has_no_recipe_in_its_card(student_run):
    """The export command's flags are not the training's: nothing is guessed from them."""
    config, student = student_run
    files.write_json(stages.summary_path(student), {"method": "rslad", "selection": {"mode": "last", "epoch": 7}})
    card = stages.model_card(student, stages.file_sha256(student), ["class"] * NUM_CLASSES)
    assert card["training"] is None and card["evaluation"]["num_examples"] == 16
