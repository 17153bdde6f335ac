"""Image-classification data from tensorflow-datasets: float32 images in [0, 1], integer labels.

Shapes, class counts and class names come from the dataset's own info. Training batches are augmented per image
with Keras layers (pad 4, random crop back to the image size, random horizontal flip) in a parallel tf.data map.
"""

import dataclasses

import keras
import tensorflow as tf
import tensorflow_datasets as tfds


class DataUnavailableError(RuntimeError):
    """The dataset is unknown or not prepared where we were told to look."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple
    class_names: tuple
    num_train: int
    num_test: int
    test_split: str


def _builder(name, data_dir):
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DataUnavailableError(f"unknown tensorflow-datasets dataset '{name}'") from error
    return builder


def _unavailable(name, data_dir):
    where = f"--data_dir={data_dir}" if data_dir else "the default tfds directory (~/tensorflow_datasets)"
    return DataUnavailableError(
        f"dataset '{name}' is not prepared in {where}: prepare it with `tfds build {name} --data_dir=DIR` on a "
        f"machine with internet access (or copy a prepared tfds directory) and pass --data_dir=DIR")


def load_info(name, data_dir=None):
    """Reads shapes, classes and split sizes from the dataset's info."""
    builder = _builder(name, data_dir)
    info = builder.info
    if "train" not in info.splits:
        raise _unavailable(name, data_dir)
    supervised = info.supervised_keys
    if not supervised:
        raise DataUnavailableError(f"dataset '{name}' has no (image, label) supervised keys")
    image_key, label_key = supervised[0], supervised[1]
    image_shape = tuple(info.features[image_key].shape)
    label = info.features[label_key]
    if None in image_shape or not hasattr(label, "num_classes"):
        raise DataUnavailableError(f"dataset '{name}' is not a fixed-size image classification dataset")
    test_split = "test" if "test" in info.splits else "validation"
    return DatasetInfo(name=name, num_classes=int(label.num_classes), image_shape=image_shape,
                       class_names=tuple(label.names), num_train=int(info.splits["train"].num_examples),
                       num_test=int(info.splits[test_split].num_examples), test_split=test_split)


def _load_split(name, split, data_dir):
    try:
        return tfds.load(name, split=split, data_dir=data_dir, as_supervised=True, download=False)
    except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as error:
        raise _unavailable(name, data_dir) from error


def to_float(image, label):
    """uint8 [0, 255] -> float32 [0, 1]; labels as int32."""
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int32)


def augmenter(image_shape, seed=None, padding=4):
    """Pad + random crop to the original size + random horizontal flip, as one Keras model over a batch."""
    height, width = image_shape[0], image_shape[1]
    return keras.Sequential([
        keras.layers.ZeroPadding2D(padding),
        keras.layers.RandomCrop(height, width, seed=seed),
        keras.layers.RandomFlip("horizontal", seed=seed),
    ], name="augment")


def train_dataset(name, data_dir, batch_size, seed=0, augment=True, shuffle_buffer=50_000):
    """Endless, shuffled, augmented batches of the train split (drop_remainder so every step sees a full batch)."""
    info = load_info(name, data_dir)
    augment_layers = augmenter(info.image_shape, seed=seed) if augment else None

    def preprocess(image, label):
        image, label = to_float(image, label)
        if augment_layers is not None:
            image = augment_layers(image[tf.newaxis], training=True)[0]
        return image, label

    dataset = _load_split(name, "train", data_dir).cache()
    dataset = dataset.shuffle(min(shuffle_buffer, info.num_train), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.repeat().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_dataset(name, data_dir, batch_size, num_examples=None):
    """The first `num_examples` images of the test split (all by default), in order, batched."""
    info = load_info(name, data_dir)
    dataset = _load_split(name, info.test_split, data_dir)
    if num_examples is not None:
        dataset = dataset.take(num_examples)
    return dataset.map(to_float, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)
