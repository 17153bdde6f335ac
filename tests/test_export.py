"""Tests of mtard_tf.export.saved_model (issue 5): TF Serving SavedModel export, versions, atomicity, serving extras."""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import keras
from google.protobuf import text_format
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from mtard_tf import files
from mtard_tf.export import saved_model

H = W = 32
CLASS_NAMES = [f"class_{i}" for i in range(10)]
OUTPUTS = {"logits", "probabilities", "class_id", "class_name"}
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")


def _tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((H, W, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(len(CLASS_NAMES))(x))


def _saved_model_cli():
    candidate = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if os.path.exists(candidate):
        return [candidate]
    if shutil.which("saved_model_cli"):
        return [shutil.which("saved_model_cli")]
    return [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, env=_ENV, timeout=120)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny student exported once, with test images (exact multiples of 1/255, so PNG is lossless)."""
    root = tmp_path_factory.mktemp("export")
    model = _tiny_model()
    path = saved_model.export_model(model, str(root / "saved_models"), "student", CLASS_NAMES)
    pixels = np.random.default_rng(1).integers(0, 256, size=(4, H, W, 3), dtype=np.uint8)
    images = pixels.astype(np.float32) / 255.0
    return {"root": root, "model": model, "path": path, "pixels": pixels, "images": images,
            "logits": model.predict(images, verbose=0)}


def test_layout_is_what_tf_serving_watches(exported):
    path = exported["path"]
    assert path == os.path.join(str(exported["root"]), "saved_models", "student", "1")
    assert sorted(os.listdir(os.path.dirname(path))) == ["1"]  # no temporary directory left behind
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert os.path.isdir(os.path.join(path, "variables"))
    assert os.path.exists(os.path.join(path, "assets.extra", "tf_serving_warmup_requests"))


def test_saved_model_cli_show_lists_both_signatures(exported):
    out = _run(_saved_model_cli() + ["show", "--dir", exported["path"], "--all"])
    sections = {}
    for block in out.split("signature_def['")[1:]:
        sections[block.split("'")[0]] = block
    assert {"serving_default", "predict_encoded"} <= set(sections)
    default, encoded = sections["serving_default"], sections["predict_encoded"]
    assert "inputs['images']" in default and "DT_FLOAT" in default and f"shape: (-1, {H}, {W}, 3)" in default
    assert "inputs['image_bytes']" in encoded and "DT_STRING" in encoded
    for block in (default, encoded):
        for key in OUTPUTS:
            assert f"outputs['{key}']" in block
        assert "tensorflow/serving/predict" in block
    assert "DT_INT64" in default  # class_id


def test_saved_model_cli_run_matches_keras(exported, tmp_path):
    np.save(tmp_path / "images.npy", exported["images"])
    _run(_saved_model_cli() + ["run", "--dir", exported["path"], "--tag_set", "serve",
                               "--signature_def", "serving_default",
                               "--inputs", f"images={tmp_path / 'images.npy'}", "--outdir", str(tmp_path / "out")])
    logits = np.load(tmp_path / "out" / "logits.npy")
    np.testing.assert_allclose(logits, exported["logits"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "class_id.npy"), exported["logits"].argmax(-1))


_FRESH_PROCESS = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    path, pngs_dir, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    loaded = tf.saved_model.load(path)
    images = np.load(pngs_dir + "/images.npy")
    default = loaded.signatures["serving_default"](images=tf.constant(images))
    pngs = [open(f"{pngs_dir}/{i}.png", "rb").read() for i in range(n)]
    encoded = loaded.signatures["predict_encoded"](image_bytes=tf.constant(pngs))

    def plain(v):  # string tensors -> unicode arrays (np.load refuses object arrays)
        v = v.numpy()
        return np.array([s.decode() for s in v]) if v.dtype == object else v

    np.savez(out, **{f"default_{k}": plain(v) for k, v in default.items()},
             **{f"encoded_{k}": plain(v) for k, v in encoded.items()})
""")


def test_fresh_process_load_agrees_with_keras(exported, tmp_path):
    n = len(exported["pixels"])
    np.save(tmp_path / "images.npy", exported["images"])
    for i, p in enumerate(exported["pixels"]):
        (tmp_path / f"{i}.png").write_bytes(tf.io.encode_png(p).numpy())
    script = tmp_path / "load.py"
    script.write_text(_FRESH_PROCESS)
    _run([sys.executable, str(script), exported["path"], str(tmp_path), str(n), str(tmp_path / "out.npz")])
    out = np.load(tmp_path / "out.npz")
    expected_id = exported["logits"].argmax(-1)
    for prefix in ("default", "encoded"):
        np.testing.assert_allclose(out[f"{prefix}_logits"], exported["logits"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(out[f"{prefix}_probabilities"], tf.nn.softmax(exported["logits"]).numpy(),
                                   atol=1e-6, rtol=0)
        assert out[f"{prefix}_class_id"].dtype == np.int64
        np.testing.assert_array_equal(out[f"{prefix}_class_id"], expected_id)
        assert list(out[f"{prefix}_class_name"]) == [CLASS_NAMES[i] for i in expected_id]


def test_bad_requests_fail_with_clear_errors(exported):
    loaded = tf.saved_model.load(exported["path"])
    default, encoded = loaded.signatures["serving_default"], loaded.signatures["predict_encoded"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"not compatible with expected shape \[\?,32,32,3\]"):
        default(images=tf.zeros([1, 28, 28, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"not compatible with expected shape"):
        default(images=tf.zeros([1, H, W, 1]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor but is a int32"):
        default(images=tf.zeros([1, H, W, 3], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor but is a double"):
        default(images=tf.zeros([1, H, W, 3], tf.float64))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must be pixel values in \[0, 1\]"):
        default(images=tf.fill([1, H, W, 3], 255.0))  # 0-255 pixels: rejected, not silently misclassified
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be 32x32 pixels"):
        encoded(image_bytes=tf.stack([tf.io.encode_png(tf.zeros([28, 28, 3], tf.uint8))]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="Unknown image file format"):
        encoded(image_bytes=tf.constant([b"not an image"]))
    # JPEG and grey PNGs of the right size are accepted.
    jpeg = tf.io.encode_jpeg(tf.constant(exported["pixels"][0]))
    grey = tf.io.encode_png(tf.constant(exported["pixels"][1][..., :1]))
    assert encoded(image_bytes=tf.stack([jpeg, grey]))["logits"].shape == (2, len(CLASS_NAMES))


def test_versions_explicit_versions_and_failed_exports(tmp_path, monkeypatch):
    model = _tiny_model()
    base = str(tmp_path / "saved_models")
    model_dir = os.path.join(base, "s")
    assert saved_model.next_version(model_dir) == 1  # missing directory
    assert saved_model.export_model(model, base, "s", CLASS_NAMES, warmup_examples=0) == os.path.join(model_dir, "1")
    assert saved_model.export_model(model, base, "s", CLASS_NAMES, warmup_examples=0) == os.path.join(model_dir, "2")
    assert not os.path.exists(os.path.join(model_dir, "2", "assets.extra"))
    with pytest.raises(ValueError, match="already exists"):
        saved_model.export_model(model, base, "s", CLASS_NAMES, version=2)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            saved_model.export_model(model, base, "s", CLASS_NAMES, version=bad)
    with pytest.raises(ValueError, match="model_name"):
        saved_model.export_model(model, base, "../escape", CLASS_NAMES)
    with pytest.raises(ValueError, match="class names"):
        saved_model.export_model(model, base, "s", CLASS_NAMES[:3])

    # A failure (or Ctrl-C) after the SavedModel is written, just before publication, leaves nothing numbered.
    for error in (RuntimeError("injected"), KeyboardInterrupt()):
        def fail(root, error=error):
            assert os.path.exists(os.path.join(root, "saved_model.pb"))  # the export really was half done
            raise error
        monkeypatch.setattr(files, "fsync_tree", fail)
        with pytest.raises(type(error)):
            saved_model.export_model(model, base, "s", CLASS_NAMES)
        assert sorted(os.listdir(model_dir)) == ["1", "2"]
        with pytest.raises(type(error)):
            saved_model.export_model(model, base, "fresh", CLASS_NAMES)
        assert os.listdir(os.path.join(base, "fresh")) == []
    monkeypatch.undo()

    assert saved_model.export_model(model, base, "s", CLASS_NAMES, version=10, warmup_examples=0).endswith("10")
    os.makedirs(os.path.join(model_dir, ".tmp-11-1"))  # e.g. left by a SIGKILLed export: ignored
    os.makedirs(os.path.join(model_dir, "notes"))
    assert saved_model.next_version(model_dir) == 11


def test_models_config_and_warmup_parse_with_serving_protos(exported, tmp_path):
    base = str(tmp_path / "saved_models")
    model = _tiny_model(seed=1)
    path_b = saved_model.export_model(model, base, "student_b", CLASS_NAMES, warmup_examples=2)
    saved_model.export_model(model, base, "student_a", CLASS_NAMES, warmup_examples=0)
    os.makedirs(os.path.join(base, "not_a_model", "latest"))  # no numeric version: not listed
    config_path = saved_model.write_models_config(base)
    assert config_path == os.path.join(base, "models.config")
    config = text_format.Parse(open(config_path).read(), model_server_config_pb2.ModelServerConfig())
    entries = [(c.name, c.base_path, c.model_platform) for c in config.model_config_list.config]
    assert entries == [("student_a", os.path.join(base, "student_a"), "tensorflow"),
                       ("student_b", os.path.join(base, "student_b"), "tensorflow")]
    assert all(os.path.isabs(c.base_path) for c in config.model_config_list.config)
    assert not [n for n in os.listdir(base) if n.startswith(".")]  # no temporary config file left

    # The module fixture's export wrote its own models.config naming "student".
    config = text_format.Parse(
        (exported["root"] / "saved_models" / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    assert [c.name for c in config.model_config_list.config] == ["student"]

    # Warm-up records: PredictionLogs naming the model; replaying them through the signatures works.
    loaded = tf.saved_model.load(path_b)
    records = list(tf.data.TFRecordDataset(os.path.join(path_b, "assets.extra", "tf_serving_warmup_requests")))
    assert len(records) == 2
    signatures = []
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        assert request.model_spec.name == "student_b"
        signatures.append(request.model_spec.signature_name)
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        outputs = loaded.signatures[request.model_spec.signature_name](**inputs)
        assert outputs["logits"].shape == (2, len(CLASS_NAMES))
    assert signatures == ["serving_default", "predict_encoded"]
    first = prediction_log_pb2.PredictionLog.FromString(records[0].numpy()).predict_log.request.inputs["images"]
    assert first.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in first.tensor_shape.dim] == [2, H, W, 3]
