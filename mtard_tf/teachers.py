"""Loading and checking teacher models: any Keras model mapping the dataset's [0, 1] images to C logits."""

import os
import zipfile

import keras


class TeacherError(ValueError):
    """A teacher file that is missing, unreadable or does not fit the dataset."""


def load_teacher(path, image_shape, num_classes):
    """Loads a frozen teacher from a .keras file and checks its input shape and number of classes."""
    if not path:
        raise TeacherError("no teacher file given")
    if not os.path.isfile(path):
        raise TeacherError(f"teacher file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise TeacherError(f"teacher file {path} is not a Keras model (.keras zip archive); it may be truncated")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a broken archive; all mean the same to the user.
        raise TeacherError(f"teacher file {path} could not be loaded as a Keras model: {error}") from error
    check_model_fits(model, image_shape, num_classes, what=f"teacher {path}")
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
