"""TensorFlow Lite export of the student (float32, float16 or int8 post-training quantisation) and the LiteRT
interpreter that runs it for evaluation.

`export_tflite` writes `<export_dir>/<model_name>/<version>.tflite` (complete or absent, versions numbered with the
SavedModels: mtard_tf.export.saved_model) with the SavedModel's input contract: input `images`, float32
[batch, H, W, 3], pixel values in [0, 1]; output `logits`, float32 [batch, num_classes]. TFLite's builtin ops have no
assertion, so unlike the SavedModel the file does not reject values outside [0, 1]. Class names and everything else a
user should know are in the model card, embedded in the file (`read_model_card`).

`TFLiteModel` runs a .tflite file on LiteRT's interpreter (ai_edge_litert) as a callable images -> logits, eagerly
or inside a tf.function (through tf.numpy_function), so the attack code of mtard_tf.attacks.autoattack queries it
like a Keras model. LiteRT is the runtime a deployed file meets on the edge, and TensorFlow's own tf.lite.Interpreter
is deprecated in its favour, so the robustness measured here is that of the runtime users run.
"""

import json
import os
import tempfile
import time

import ai_edge_litert
import numpy as np
import tensorflow as tf
import keras
from ai_edge_litert import interpreter as litert

from mtard_tf import files
from mtard_tf.config import QUANTIZATIONS
from mtard_tf.errors import UserError
from mtard_tf.export import saved_model
from mtard_tf.job import startup

MODEL_CARD_METADATA = "model_card"  # the TFLite metadata entry holding the model card (UTF-8 JSON)
NUM_THREADS = 2
RUNTIME = f"LiteRT {ai_edge_litert.__version__}"  # what evaluates a .tflite file, as reports name it


class TFLiteError(UserError):
    """A .tflite file that cannot be loaded or evaluated as asked."""


def convert(model, quantize="none", representative_images=None):
    """The TFLite flatbuffer (bytes) of a Keras model mapping float32 images in [0, 1] to logits.

    quantize:
      none: float32 weights and arithmetic.
      float16: float16 weights (TFLite's float16 post-training quantisation), half the file; a CPU dequantises them
        to float32 at load time, so the arithmetic stays float32 there.
      int8: full-integer post-training quantisation: weights int8 (per channel), activations int8 with ranges
        calibrated on `representative_images` (float32 [N, H, W, C] in [0, 1], fed one at a time), and only int8
        builtin kernels (TFLITE_BUILTINS_INT8: the conversion fails rather than leave a float op). Input and output
        stay float32: the model quantises the images and dequantises the logits itself. That keeps the
        SavedModel's input contract (float pixels in [0, 1]) and lets the same evaluation and attack code query
        every export, at the cost of two cheap boundary ops. Integer I/O (scale and zero point in the tensor's
        quantisation parameters) matters only for integer-only accelerators (Edge TPU, microcontrollers).

    The model is converted from a SavedModel with a single logits endpoint (written to a temporary directory):
    Keras 3 variables are frozen into constants that way, and the converter's native log is held back.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    if quantize == "int8" and (representative_images is None or not len(representative_images)):
        raise ValueError("int8 quantisation needs representative images")
    height, width = saved_model.image_size(model)
    with tempfile.TemporaryDirectory() as directory, startup.held_back_stderr():
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            name="serving_default", fn=lambda images: {"logits": tf.cast(model(images, training=False), tf.float32)},
            input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name=saved_model.IMAGES_INPUT)])
        archive.write_out(directory, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory)
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            images = np.asarray(representative_images, np.float32)
            converter.representative_dataset = lambda: ([image[np.newaxis]] for image in images)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        return converter.convert()


def with_metadata(content, name, payload):
    """The flatbuffer `content` with the metadata entry `name` (replaced if present) holding the bytes `payload`.

    A TFLite model's `metadata` is a list of (name, buffer index) in its schema; TFLiteConverter stores its own
    CONVERSION_METADATA this way, with the flatbuffer object API TensorFlow ships (tensorflow.lite.tools.
    flatbuffer_utils), which is used here too: no tflite_support needed. Interpreters ignore entries they do not know.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(payload, dtype=np.uint8)
    model.buffers = list(model.buffers or [])
    entries = [entry for entry in (model.metadata or []) if entry.name.decode() == name]
    if entries:
        model.buffers[entries[0].buffer] = buffer
    else:
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name.encode()
        entry.buffer = len(model.buffers) - 1
        model.metadata = list(model.metadata or []) + [entry]
    return flatbuffer_utils.convert_object_to_bytearray(model)


def read_metadata(content, name):
    """The bytes of the metadata entry `name` of a TFLite flatbuffer, or None."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == name:
            return model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    return None


def read_model_card(path):
    """The model card embedded in a .tflite file (a dict), or None if it has none."""
    with open(path, "rb") as f:
        payload = read_metadata(f.read(), MODEL_CARD_METADATA)
    return None if payload is None else json.loads(payload.decode())


def export_tflite(model, export_dir, model_name, quantize="none", *, representative_images=None, version=None,
                  model_card=None):
    """Converts `model` (`convert`) and writes `<export_dir>/<model_name>/<version>.tflite` atomically.

    version: a positive integer not used by a SavedModel or another .tflite file; None takes the next free one.
    model_card: what to state about the model; embedded as the metadata entry "model_card" (JSON) with this
    export's format, name, version, quantisation, input and output. Returns the file's absolute path.

    Args:
      model: a Keras model mapping float32 images in [0, 1] to logits.
      export_dir, model_name: where the file goes (the SavedModel layout's directories).
      quantize: "none", "float16" or "int8" (convert); representative_images: int8's calibration images.

    Example:

    >>> path = mtard_tf.export_tflite(student, "saved_models", "my_student", quantize="float16")
    >>> logits = mtard_tf.TFLiteModel(path)(images)
    """
    height, width = saved_model.image_size(model)
    content = convert(model, quantize, representative_images)
    model_dir, version = saved_model.claim_version(export_dir, model_name, version)
    path = os.path.join(model_dir, f"{version}{saved_model.TFLITE_SUFFIX}")
    if model_card is not None:
        card = {**model_card, "format": "tflite", "model_name": model_name, "version": version,
                "quantization": quantize, "input": saved_model.images_input(height, width),
                "outputs": ["logits"]}
        if quantize == "int8":
            card["representative_examples"] = len(representative_images)
        content = with_metadata(content, MODEL_CARD_METADATA, json.dumps(card, indent=2, sort_keys=True).encode())
    with files.atomic_file(path, "wb") as f:
        if os.path.lexists(path):  # another exporter published this version meanwhile
            raise saved_model.ExportError(f"{path} appeared during the export; not overwriting it")
        f.write(content)
    return path


class TFLiteModel:
    """A .tflite classifier (float32 images in [0, 1] -> float32 logits) on LiteRT's interpreter (`RUNTIME`), callable
    like a Keras model: model(images) -> logits.

    Called with a tensor (eager, or symbolic inside a tf.function: Square's search loop), it runs the interpreter
    through tf.numpy_function, which has no gradient: only query-based attacks can run against it directly. The
    interpreter's batch dimension follows each call's batch.

    Args:
      path: the .tflite file (float32 image input, float32 logits output).
      num_threads: the interpreter's threads.

    Example:

    >>> deployed = mtard_tf.TFLiteModel("saved_models/my_student/3.tflite")
    >>> predictions = np.argmax(deployed.logits(images), axis=1)
    """

    def __init__(self, path, num_threads=NUM_THREADS):
        if not os.path.isfile(path):
            raise TFLiteError(f"TFLite file {path} does not exist")
        self.path = path
        with startup.held_back_stderr():
            try:
                self.interpreter = litert.Interpreter(model_path=path, num_threads=num_threads)
                self.interpreter.allocate_tensors()  # applies the XNNPACK delegate, whose INFO line is held back
            except ValueError as error:
                raise TFLiteError(f"{path} is not a TFLite model: {error}") from error
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0]["shape"]) != 4:
            raise TFLiteError(f"{path} is not an image classifier with one input [batch, H, W, C] and one output")
        if inputs[0]["dtype"] != np.float32 or outputs[0]["dtype"] != np.float32:
            raise TFLiteError(f"{path} has {np.dtype(inputs[0]['dtype']).name} input and "
                              f"{np.dtype(outputs[0]['dtype']).name} output; float32 images in [0, 1] -> float32 "
                              "logits expected (as mtard_tf exports every quantisation)")
        self._input, self._output = inputs[0]["index"], outputs[0]["index"]
        self.image_shape = tuple(int(v) for v in inputs[0]["shape"][1:])
        self.num_classes = int(outputs[0]["shape"][-1])
        self._batch = int(inputs[0]["shape"][0])

    def logits(self, images):
        """Logits (numpy [B, num_classes]) of numpy images [B, H, W, C]."""
        images = np.asarray(images, np.float32)
        if images.shape[0] == 0:
            return np.zeros((0, self.num_classes), np.float32)
        if images.shape[0] != self._batch:
            self.interpreter.resize_tensor_input(self._input, list(images.shape), strict=False)
            self.interpreter.allocate_tensors()
            self._batch = images.shape[0]
        self.interpreter.set_tensor(self._input, images)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output).copy()

    def __call__(self, images, training=False):
        del training  # always inference
        logits = tf.numpy_function(self.logits, [tf.cast(images, tf.float32)], tf.float32, stateful=True)
        return tf.ensure_shape(logits, [None, self.num_classes])

    def latency(self, images):
        """Median wall time (seconds) of one image through the interpreter (batch 1, input copy and output copy
        included), over `images`, after one warm-up run."""
        images = np.asarray(images, np.float32)
        self.logits(images[:1])
        seconds = []
        for image in images:
            start = time.perf_counter()
            self.logits(image[np.newaxis])
            seconds.append(time.perf_counter() - start)
        return float(np.median(seconds))
