"""Export a trained student as a versioned SavedModel that TF Serving loads as it is.

Layout (what TF Serving's file-system source watches)::

    EXPORT_DIR/
      models.config                      # text ModelServerConfig listing every exported model
      NAME/
        1/                               # one SavedModel per positive integer version
          saved_model.pb  variables/  assets/  fingerprint.pb
          assets.extra/tf_serving_warmup_requests   # PredictionLog records (TFRecord)
          assets.extra/model_card.json   # what the model is: training recipe, evaluation, source file's sha256
        2/ ...
        3.tflite                         # a TensorFlow Lite export (mtard_tf.export.tflite); versions count across both

A version number names one export, SavedModel or TFLite file, so `next_version` is the next number free for both.
TF Serving reads only the numeric directories.

Signatures (tag "serve"), H x W the model's input size:

* ``serving_default``: input ``images``, float32 ``[batch, H, W, 3]`` with pixel values in [0, 1]. TF Serving does
  not check a request against the signature's shape, so the graph does: another shape, or a value outside [0, 1]
  (e.g. 0-255 pixels sent as JSON numbers), fails with an InvalidArgumentError instead of a wrong answer. A tensor
  of another dtype (gRPC) is refused by TF itself ("expected to be a float tensor").
* ``predict_encoded``: input ``image_bytes``, string ``[batch]``; each element the bytes of a PNG or JPEG file
  (BMP and GIF are decoded too, a GIF by its first frame), i.e. what a REST client sends as ``{"b64": ...}``.
  Every image is decoded in the graph to 3 channels (grey is replicated, alpha dropped), converted to float32 in
  [0, 1] (8-bit value / 255; a 16-bit PNG is first reduced to 8 bits) and must already be H x W: an image of any
  other size is rejected with an InvalidArgumentError naming the expected size. Nothing is resized, so the served
  prediction is the prediction on exactly the pixels sent (resizing would silently change the input that the
  robustness guarantees are about).

Both signatures return:

* ``logits``: float32 ``[batch, num_classes]``, the student's output (the student outputs logits);
* ``probabilities``: float32 ``[batch, num_classes]``, softmax of the logits;
* ``class_id``: int64 ``[batch]``, argmax of the logits;
* ``class_name``: string ``[batch]``, ``class_names[class_id]``.

Publication is atomic: a version is written as ``NAME/.tmp-<version>-<pid>`` (not numeric, so TF Serving never
looks at it) and renamed to ``NAME/<version>`` with ``os.replace`` only when the SavedModel and its warm-up file are
complete; any exception, KeyboardInterrupt included, removes the temporary directory. ``models.config`` is also
written to a temporary file and renamed. A process killed with SIGKILL can leave a ``.tmp-*`` directory behind;
TF Serving ignores it and it may be deleted.
"""

import logging
import os
import re
import shutil

import numpy as np
import tensorflow as tf
import keras

from mtard_tf import files
from mtard_tf.errors import UserError


class ExportError(UserError, ValueError):
    """A model, name or version that cannot be exported as asked."""

SERVING_DEFAULT = "serving_default"
PREDICT_ENCODED = "predict_encoded"
IMAGES_INPUT = "images"
IMAGE_BYTES_INPUT = "image_bytes"
OUTPUT_KEYS = ("logits", "probabilities", "class_id", "class_name")
MODELS_CONFIG = "models.config"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MODEL_CARD_FILE = os.path.join("assets.extra", "model_card.json")
TFLITE_SUFFIX = ".tflite"

_RANGE_MESSAGE = "images must be pixel values in [0, 1] (8-bit pixels divided by 255)"
_VERSION_RE = re.compile(r"^[0-9]+$")
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _numeric_versions(model_dir_for_name):
    """The integer versions TF Serving would see under a model's base path (all-digit directory names)."""
    try:
        names = os.listdir(model_dir_for_name)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names
                  if _VERSION_RE.match(n) and os.path.isdir(os.path.join(model_dir_for_name, n)))


def _used_versions(model_dir_for_name):
    """The versions taken under a model's base path: SavedModel directories and `<version>.tflite` files."""
    try:
        names = os.listdir(model_dir_for_name)
    except FileNotFoundError:
        return []
    tflite = [int(n[:-len(TFLITE_SUFFIX)]) for n in names
              if n.endswith(TFLITE_SUFFIX) and _VERSION_RE.match(n[:-len(TFLITE_SUFFIX)])]
    return sorted(set(_numeric_versions(model_dir_for_name)) | set(tflite))


def next_version(model_dir_for_name: str) -> int:
    """1 + the largest version (SavedModel directory or .tflite file) under `model_dir_for_name`, or 1."""
    versions = _used_versions(model_dir_for_name)
    return versions[-1] + 1 if versions else 1


def claim_version(export_dir, model_name, version=None):
    """(the model's base directory, created if missing; the version to write): `version`, or the next free one.

    Raises ExportError for a bad model name or version, a version that exists already (in either format), or an
    export_dir where the directory cannot be made (e.g. a file).
    """
    if not isinstance(model_name, str) or not _MODEL_NAME_RE.match(model_name):
        raise ExportError(f"model_name must match {_MODEL_NAME_RE.pattern} (it is a directory and a URL part); "
                         f"got {model_name!r}")
    model_dir = os.path.abspath(os.path.join(export_dir, model_name))
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as error:
        raise ExportError(f"cannot create {model_dir} under --export_dir={export_dir}: "
                          f"{error.strerror or error}") from error
    if version is None:
        return model_dir, next_version(model_dir)
    if isinstance(version, bool) or int(version) != version or version < 1:
        raise ExportError(f"version must be a positive integer; got {version!r}")
    version = int(version)
    if version in _used_versions(model_dir):
        raise ExportError(f"version {version} of model {model_name!r} already exists under {model_dir}; "
                         f"not overwriting it (omit the version to use {next_version(model_dir)})")
    return model_dir, version


def images_input(height, width):
    """The input contract of every export, as a model card states it."""
    return {"name": IMAGES_INPUT, "dtype": "float32", "shape": [None, height, width, 3], "range": [0.0, 1.0]}


def image_size(model):
    """(H, W) of an image model's input [batch, H, W, 3]; ExportError for any other model."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError) as e:  # e.g. a subclassed model never built on a keras.Input
        raise ExportError(f"an export needs a model with a defined input shape (build it on a keras.Input): {e}")
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[3] == 3
            and isinstance(shape[1], int) and isinstance(shape[2], int)):
        raise ExportError(
            f"an export needs a single-input image model with input shape (batch, H, W, 3) and fixed H, W; "
            f"got model.input_shape={shape!r}")
    return shape[1], shape[2]


def _build_signatures(model, class_names, height, width):
    """The two serving functions (plain Python callables; ExportArchive wraps them in tf.function)."""
    names = list(class_names)

    def outputs(images):
        logits = tf.cast(model(images, training=False), tf.float32)
        class_id = tf.argmax(logits, axis=-1, output_type=tf.int64)
        return {
            "logits": logits,
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "class_id": class_id,
            "class_name": tf.gather(tf.constant(names, dtype=tf.string), class_id),
        }

    def decode_one(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)  # uint8 (uint16 PNG is rescaled)
        check = tf.debugging.assert_equal(
            tf.shape(image)[:2], tf.constant([height, width], tf.int32),
            message=f"{PREDICT_ENCODED}: every image must be {height}x{width} pixels (height x width); "
                    f"images are not resized")
        with tf.control_dependencies([check]):
            image = tf.identity(image)
        image.set_shape([height, width, 3])
        return tf.image.convert_image_dtype(image, tf.float32)  # uint8 / 255 -> [0, 1]

    def serve_images(images):
        # A request's shape is not checked against the signature by TF Serving; check it here.
        images = tf.ensure_shape(images, [None, height, width, 3])
        checks = [
            tf.debugging.assert_greater_equal(images, 0.0, message=f"{SERVING_DEFAULT}: {_RANGE_MESSAGE}"),
            tf.debugging.assert_less_equal(images, 1.0, message=f"{SERVING_DEFAULT}: {_RANGE_MESSAGE}"),
        ]
        with tf.control_dependencies(checks):
            images = tf.identity(images)
        return outputs(images)

    def serve_encoded(image_bytes):
        images = tf.map_fn(decode_one, image_bytes,
                           fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32))
        return outputs(images)

    return serve_images, serve_encoded


def _write_warmup(path, model_name, height, width, examples):
    """`examples` images as one PredictRequest per signature, stored as PredictionLog records (TFRecord)."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    pixels = np.random.default_rng(0).integers(0, 256, size=(examples, height, width, 3), dtype=np.uint8)
    requests = []
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = SERVING_DEFAULT
    request.inputs[IMAGES_INPUT].CopyFrom(tf.make_tensor_proto(pixels.astype(np.float32) / 255.0, dtype=tf.float32))
    requests.append(request)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = PREDICT_ENCODED
    pngs = [tf.io.encode_png(p).numpy() for p in pixels]
    request.inputs[IMAGE_BYTES_INPUT].CopyFrom(tf.make_tensor_proto(pngs, dtype=tf.string, shape=[examples]))
    requests.append(request)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def export_model(model: keras.Model, export_dir: str, model_name: str, class_names: list,
                 version: int = None, warmup_examples: int = 1, model_card: dict = None) -> str:
    """Export `model` to `export_dir/model_name/<version>/` and refresh `export_dir/models.config`.

    Args:
      model: a Keras model mapping float32 images [batch, H, W, 3] in [0, 1] to logits [batch, num_classes].
      export_dir: the base directory holding one sub-directory per model name (created if missing).
      model_name: the TF Serving model name; letters, digits, '.', '_' and '-', not starting with '.', '_' or '-'.
      class_names: num_classes labels; the `class_name` output is `class_names[class_id]`.
      version: a positive integer; None takes `next_version`. An existing version is never overwritten.
      warmup_examples: images in each warm-up request (one request per signature) written to
        `assets.extra/tf_serving_warmup_requests`; 0 writes no warm-up file.
      model_card: what to state about the model (training recipe, evaluation, source file); written with this
        export's format, name, version, precision, input and outputs to `assets.extra/model_card.json`. None: no
        card.

    Returns:
      The absolute path of the published version directory.

    Raises:
      ExportError: bad model name, model shape, class names or version, or the version already exists.

    Example:

    >>> path = mtard_tf.export_saved_model(distiller.student, "saved_models", "my_student", ["cat", "dog"])
    >>> served = tf.saved_model.load(path).signatures["serving_default"]
    >>> served(images=tf.zeros([1, 32, 32, 3]))["class_name"]
    """
    height, width = image_size(model)
    class_names = [str(c) for c in class_names]
    try:
        output_shape = model.output_shape
    except (AttributeError, ValueError):
        output_shape = None
    num_classes = output_shape[-1] if isinstance(output_shape, tuple) else None
    if num_classes is not None and len(class_names) != num_classes:
        raise ExportError(f"model has {num_classes} outputs but {len(class_names)} class names were given")
    if int(warmup_examples) < 0:
        raise ExportError(f"warmup_examples must be >= 0; got {warmup_examples}")

    model_dir, version = claim_version(export_dir, model_name, version)
    final_dir = os.path.join(model_dir, str(version))
    tmp_dir = os.path.join(model_dir, f".tmp-{version}-{os.getpid()}")
    if os.path.lexists(tmp_dir):
        shutil.rmtree(tmp_dir)
    try:
        serve_images, serve_encoded = _build_signatures(model, class_names, height, width)
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            name=SERVING_DEFAULT, fn=serve_images,
            input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name=IMAGES_INPUT)])
        archive.add_endpoint(
            name=PREDICT_ENCODED, fn=serve_encoded,
            input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_INPUT)])
        archive.write_out(tmp_dir, verbose=False)
        if warmup_examples:
            _write_warmup(os.path.join(tmp_dir, WARMUP_FILE), model_name, height, width, int(warmup_examples))
        if model_card is not None:
            files.write_json(os.path.join(tmp_dir, MODEL_CARD_FILE), {
                **model_card, "format": "savedmodel", "model_name": model_name, "version": version,
                "precision": model.dtype_policy.name, "input": images_input(height, width),
                "outputs": list(OUTPUT_KEYS), "signatures": [SERVING_DEFAULT, PREDICT_ENCODED]})
        files.fsync_tree(tmp_dir)
        if os.path.lexists(final_dir):  # another exporter published this version meanwhile
            raise ExportError(f"version directory {final_dir} appeared during the export; not overwriting it")
        os.replace(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    files.fsync_path(model_dir)
    logging.info("Exported %s version %d to %s", model_name, version, final_dir)
    write_models_config(export_dir)
    return final_dir


def write_models_config(export_dir: str) -> str:
    """Write `export_dir/models.config`, a text ModelServerConfig with one entry per model directory.

    A model directory is a sub-directory of `export_dir` (name not starting with '.') holding at least one numeric
    version directory. Base paths are absolute. Returns the path of the file.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    export_dir = os.path.abspath(export_dir)
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.SetInParent()  # an empty list still reads as `model_config_list {}`
    for name in sorted(os.listdir(export_dir)):
        base_path = os.path.join(export_dir, name)
        if name.startswith(".") or not os.path.isdir(base_path) or not _numeric_versions(base_path):
            continue
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = base_path
        entry.model_platform = "tensorflow"
    return files.write_text(os.path.join(export_dir, MODELS_CONFIG), text_format.MessageToString(config))
