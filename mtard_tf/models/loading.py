"""Teachers and other model files: loading a .keras file and checking that it fits the dataset.

Any Keras model mapping the dataset's [0, 1] images to C logits is a valid teacher (methods/baselines.py trains them).
"""

import os
import zipfile

import keras
from mtard_tf.errors import UserError


class TeacherError(UserError, ValueError):
    """A teacher file that is missing, unreadable or does not fit the dataset."""


def load_model(path, image_shape, num_classes, what="teacher"):
    """Loads a .keras model file and checks its input shape and number of classes (TeacherError otherwise)."""
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
    check_model_fits(model, image_shape, num_classes, what=f"{what} {path}")
    return model


def load_teacher(path, image_shape, num_classes):
    """A frozen teacher from a .keras file (load_model)."""
    model = load_model(path, image_shape, num_classes)
    model.trainable = False
    return model


def check_model_fits(model, image_shape, num_classes, what="model"):
    """Raises TeacherError unless `model` maps [B, *image_shape] images to [B, num_classes] logits."""
    input_shape = tuple(model.input_shape[1:]) if hasattr(model, "input_shape") else None
    if input_shape != tuple(image_shape):
        raise TeacherError(f"{what} expects input images of shape {input_shape}, but the dataset's images are "
                           f"{tuple(image_shape)}")
    output_shape = tuple(model.output_shape[1:])
    if output_shape != (num_classes,):
        raise TeacherError(f"{what} outputs shape {output_shape}, but the dataset has {num_classes} classes "
                           f"(expected ({num_classes},) logits)")
