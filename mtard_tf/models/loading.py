"""Teachers and other model files: loading a .keras file and checking that it fits the dataset and outputs logits.

Any Keras model mapping the dataset's [0, 1] images to C logits is a valid teacher (methods/baselines.py trains them).
A model whose outputs are probabilities (a final softmax) is refused, by the command and by the trainers: the losses
take softmax(z / tau) of the outputs, and of values in [0, 1] that is nearly uniform, so a student would learn from
a near-constant target. `strip_softmax` gives the logits model behind it.
"""

import os
import zipfile

import keras
import numpy as np

from mtard_tf.errors import UserError

# Outputs on the probe batch count as probabilities when every value is in [0, 1] and every row sums to 1 within this.
_SUM_TOLERANCE = 1e-3
PROBE_IMAGES = 4


class TeacherError(UserError, ValueError):
    """A teacher file that is missing, unreadable or does not fit the dataset."""


class ProbabilityOutputError(UserError, ValueError):
    """A teacher or student whose outputs are probabilities (a final softmax) where logits are needed."""


def load_model(path, image_shape, num_classes, what="teacher", remove_softmax=False):
    """Loads a .keras model file and checks its input shape, number of classes and logits (TeacherError,
    ProbabilityOutputError otherwise); with `remove_softmax`, a final softmax is removed first (strip_softmax).

    Args:
      path: the .keras file.
      image_shape: (H, W, C) the model must take. num_classes: the number of outputs it must give.
      what: how error messages name the file ("teacher", "model").
      remove_softmax: strip a final softmax instead of refusing the model.

    Returns:
      The keras.Model (uncompiled).

    Example:

    >>> teacher = mtard_tf.load_model("teacher.keras", (32, 32, 3), 10, remove_softmax=True)
    """
    if not path:
        raise TeacherError(f"no {what} file given")
    if os.path.isdir(path):
        raise TeacherError(f"{what} {path} is a directory (a SavedModel?), not a .keras file: SavedModels are for "
                           "serving and carry no Keras model to train or attack; give the .keras file it came from")
    if not os.path.isfile(path):
        raise TeacherError(f"{what} file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise TeacherError(f"{what} file {path} is not a Keras model (.keras zip archive); it may be truncated")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a broken archive; all mean the same to the user.
        raise TeacherError(f"{what} file {path} could not be loaded as a Keras model: {error}") from error
    if remove_softmax and softmax_layer(model) is not None:
        model = strip_softmax(model)
    check_model_fits(model, image_shape, num_classes, what=f"{what} {path}",
                     fix="re-save it without its final softmax, or pass --strip_softmax to remove it on loading")
    return model


def load_teacher(path, image_shape, num_classes, remove_softmax=False):
    """A frozen teacher from a .keras file (load_model)."""
    model = load_model(path, image_shape, num_classes, remove_softmax=remove_softmax)
    model.trainable = False
    return model


def check_model_fits(model, image_shape, num_classes, what="model", fix=None):
    """Raises TeacherError unless `model` maps [B, *image_shape] images to [B, num_classes] outputs, and
    ProbabilityOutputError unless those outputs are logits (check_logits, `fix` its advice)."""
    input_shape = tuple(model.input_shape[1:]) if hasattr(model, "input_shape") else None
    if input_shape != tuple(image_shape):
        raise TeacherError(f"{what} expects input images of shape {input_shape}, but the dataset's images are "
                           f"{tuple(image_shape)}")
    output_shape = tuple(model.output_shape[1:])
    if output_shape != (num_classes,):
        raise TeacherError(f"{what} outputs shape {output_shape}, but the dataset has {num_classes} classes "
                           f"(expected ({num_classes},) logits)")
    check_logits(model, what, image_shape=image_shape, fix=fix)


def _is_softmax(layer):
    """A Softmax layer, or a layer whose `activation` is softmax (Dense(..., activation="softmax"), Activation)."""
    if isinstance(layer, keras.layers.Softmax):
        return True
    return getattr(getattr(layer, "activation", None), "__name__", None) == "softmax"


def _output_layer(model):
    """The layer that computes the model's (single) output, or None for a subclassed or unbuilt model."""
    if isinstance(model, keras.Sequential):
        return model.layers[-1] if model.layers else None
    outputs = getattr(model, "outputs", None) if isinstance(model, keras.Model) else None
    try:
        if outputs and len(outputs) == 1:
            return outputs[0]._keras_history.operation  # pylint: disable=protected-access
    except AttributeError:
        return None
    return None


def softmax_layer(model):
    """The layer that applies `model`'s final softmax (a Softmax or Activation layer, or a layer with
    activation="softmax"), or None.

    Args:
      model: a keras.Model (functional or Sequential; a subclassed model's layers are not inspected).

    Returns:
      The keras layer, or None when no final softmax is found.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    >>> softmax_layer(model).name
    'dense'
    """
    layer = _output_layer(model)
    return layer if layer is not None and _is_softmax(layer) else None


def _probe_shape(model, image_shape):
    if image_shape is not None:
        return tuple(image_shape)
    try:
        shape = tuple(model.input_shape[1:])
    except (AttributeError, ValueError):
        return None
    return shape if shape and all(isinstance(d, int) for d in shape) else None


def outputs_probabilities(model, image_shape=None):
    """Whether `model` outputs probabilities rather than logits: a final softmax (softmax_layer), or outputs on a
    probe batch (PROBE_IMAGES uniform images in [0, 1], NumPy seed 0, inference mode) all in [0, 1] with every row
    summing to 1 (within 1e-3).

    Logits with that property would be a coincidence: they are unconstrained real numbers. The probe runs only when
    the input shape is known (`image_shape`, or the model's own input shape), so a subclassed model that has not
    been built is judged by its structure alone.

    Args:
      model: a keras.Model or a callable `model(images, training=False)`.
      image_shape: (H, W, C) of the probe images; None takes the model's input shape.

    Returns:
      True when the outputs are probabilities.

    Example:

    >>> probabilities = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
    ...                                   keras.layers.Dense(3, activation="softmax")])
    >>> outputs_probabilities(probabilities), outputs_probabilities(strip_softmax(probabilities))
    (True, False)
    """
    if softmax_layer(model) is not None:
        return True
    shape = _probe_shape(model, image_shape)
    if shape is None:
        return False
    images = np.random.default_rng(0).uniform(0.0, 1.0, (PROBE_IMAGES, *shape)).astype(np.float32)
    outputs = np.asarray(keras.ops.convert_to_numpy(model(images, training=False)), np.float64)
    if outputs.ndim != 2:
        return False
    in_range = bool(np.all((outputs >= 0.0) & (outputs <= 1.0)))
    return in_range and bool(np.all(np.abs(outputs.sum(axis=1) - 1.0) <= _SUM_TOLERANCE))


def check_logits(model, what="model", image_shape=None, fix=None):
    """Raises ProbabilityOutputError, one line naming the problem and its fix, when `model` outputs probabilities
    (outputs_probabilities).

    The trainers and the attacks take logits: the distillation targets are softmax(z / tau) of the teachers'
    outputs, and softmax(p / tau) of probabilities p in [0, 1] is nearly uniform.

    Args:
      model: the keras.Model to check.
      what: how the message names it ("teacher clean.keras", "student").
      image_shape: (H, W, C) of the probe batch; None takes the model's input shape.
      fix: the advice of the message; default: re-save without the softmax or call mtard_tf.strip_softmax.

    Returns:
      `model`, when its outputs are logits.

    Example:

    >>> teacher = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
    ...                             keras.layers.Dense(3, activation="softmax")])
    >>> check_logits(teacher, "teacher")
    Traceback (most recent call last):
    ...
    mtard_tf.models.loading.ProbabilityOutputError: teacher outputs probabilities (a final softmax), not logits: ...
    """
    if outputs_probabilities(model, image_shape):
        found = softmax_layer(model)
        where = (f"its last layer '{found.name}' applies a softmax" if found is not None
                 else "its outputs on a probe batch are in [0, 1] and sum to 1")
        fix = fix or ("re-save it without its final softmax, or pass it through mtard_tf.strip_softmax(model), "
                      "which returns the same network with the softmax removed")
        raise ProbabilityOutputError(
            f"{what} outputs probabilities ({where}), not logits: distillation and attacks need logits, and "
            f"softmax(p / tau) of probabilities is nearly uniform; {fix}")
    return model


def strip_softmax(model):
    """The logits model behind a model that ends in a softmax: the same layers and weights, the softmax removed.

    A final Softmax or Activation("softmax") layer is dropped (the new model shares every other layer with
    `model`); a final layer with activation="softmax" (Dense, Conv2D, ...) is rebuilt with a linear activation and
    the same weights. softmax(strip_softmax(model)(x)) == model(x).

    Args:
      model: a functional or Sequential keras.Model whose output layer applies a softmax.

    Returns:
      A keras.Model mapping the same inputs to logits.

    Raises:
      ProbabilityOutputError: no final softmax layer is found (a subclassed model, or a softmax inside a nested
        model); re-save such a model without its softmax.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    >>> logits = strip_softmax(model)
    >>> x = np.ones((2, 4), np.float32)
    >>> bool(np.allclose(keras.ops.softmax(logits(x)), model(x), atol=1e-6))
    True
    """
    layer = softmax_layer(model)
    if layer is None:
        raise ProbabilityOutputError(
            f"model '{model.name}' has no final softmax layer to strip (a subclassed model, or a softmax inside a "
            "nested model): re-save it so that it outputs logits")
    if isinstance(layer, (keras.layers.Softmax, keras.layers.Activation)):
        if isinstance(model, keras.Sequential):
            return keras.Sequential([keras.Input(model.input_shape[1:]), *model.layers[:-1]],
                                     name=f"{model.name}_logits")
        return keras.Model(model.input, layer.input, name=f"{model.name}_logits")

    def clone(original):
        config = original.get_config()
        if original is layer:
            config["activation"] = "linear"
        return original.__class__.from_config(config)

    logits = keras.models.clone_model(model, clone_function=clone)
    logits.set_weights(model.get_weights())
    logits.trainable = model.trainable
    return logits
