"""Image-classification data from tensorflow-datasets: float32 images in [0, 1], integer labels.

Shapes, class counts and class names come from the dataset's own info. The training stream is a pure function of
(seed, position): position p = e * N + i of the stream is example index_shuffle(i, (seed, e)) of the train split (a
fresh permutation every epoch e), augmented (pad 4, random crop back to the image size, random horizontal flip)
with stateless random ops seeded by (seed, p). So a run resumed at step s sees exactly the batches an uninterrupted
run sees, whatever the parallelism of the map, and resuming costs nothing. The train split is held in memory as
uint8 (150 MB for CIFAR, 1.2 GB for Tiny-ImageNet); tf.data's stateful shuffle was not used because its order
depended on process state.
(Keras' RandomCrop/RandomFlip layers draw from a stateful seed generator, which a parallel tf.data map consumes in
a nondeterministic order, and RandomCrop uses one offset per batch; hence tf.image's stateless ops.)

Evaluation uses the dataset's test split, or its validation split where it has none (Tiny-ImageNet, whose test
images carry no labels). Datasets built from files the user downloads (tfds' manual datasets, e.g. `tiny_imagenet`,
registered by importing mtard_tf.tiny_imagenet) are built from the manual directory on first use.
"""

import dataclasses
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from mtard_tf import tiny_imagenet  # noqa: F401 - registers the tfds dataset `tiny_imagenet`
from mtard_tf.errors import UserError


class DataUnavailableError(UserError, RuntimeError):
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


def prepare(name, data_dir=None, download=True, manual_dir=None):
    """Makes sure the dataset is prepared in `data_dir` (tfds' default directory if None): on first use, with
    `download`, tensorflow-datasets downloads and prepares it there; a failed download or `download=False` on a
    dataset that is not there is a DataUnavailableError of one line. A manual dataset (one built from files the user
    downloads, e.g. tiny_imagenet) is built from `manual_dir` (tfds' default: <data_dir>/downloads/manual/) whatever
    `download` says, since building it needs no network; `manual_dir` given for any other dataset is a UserError.
    """
    builder = _builder(name, data_dir)
    if manual_dir and not builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        raise UserError(f"--manual_dir applies to a dataset built from files downloaded by hand (tiny_imagenet); "
                        f"tensorflow-datasets gets '{name}' itself")
    if "train" in builder.info.splits:
        return
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        _build_from_manual_dir(builder, manual_dir)
        return
    if not download:
        raise _unavailable(name, data_dir)
    print(f"dataset '{name}': first use, downloading and preparing it in {builder.data_dir}", flush=True)
    try:
        builder.download_and_prepare()
    except Exception as error:  # requests, OSError, tfds' own: for the user all mean "the download failed"
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DataUnavailableError(
            f"dataset '{name}' could not be downloaded ({type(error).__name__}: {reason}); without internet access, "
            f"prepare it with `tfds build {name} --data_dir=DIR` elsewhere and pass --data_dir=DIR") from error


def _build_from_manual_dir(builder, manual_dir):
    """builder.download_and_prepare from `manual_dir`, by default tfds' <data_dir>/downloads/manual/."""
    manual_dir = manual_dir or os.path.join(builder.data_dir_root, "downloads", "manual")
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
        instructions = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
        raise DataUnavailableError(f"dataset '{builder.name}' is built from files downloaded by hand, and the manual "
                                   f"directory {manual_dir} does not exist or is empty: {instructions}")
    print(f"dataset '{builder.name}': first use, building it in {builder.data_dir} from {manual_dir}", flush=True)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


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
    test_split = next((split for split in ("test", "validation") if split in info.splits), None)
    if test_split is None:
        raise DataUnavailableError(f"dataset '{name}' has no test or validation split to evaluate on (its splits: "
                                   f"{', '.join(sorted(info.splits))})")
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


def augment_image(image, seed, padding=4):
    """Zero-pad by `padding`, crop back to the original size at a random offset, flip left-right with p = 1/2.

    `seed` is a stateless seed (shape [2]); the same seed gives the same augmentation.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    cropped = tf.image.stateless_random_crop(padded, tf.shape(image), seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(cropped, seed=flip_seed)


def _train_arrays(name, data_dir):
    """The whole train split as (uint8 images [N, H, W, C], labels [N]) tensors."""
    try:
        images, labels = tfds.load(name, split="train", data_dir=data_dir, as_supervised=True, download=False,
                                   batch_size=-1)
    except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as error:
        raise _unavailable(name, data_dir) from error
    return images, labels


def train_dataset(name, data_dir, batch_size, seed=0, augment=True, start_step=0, holdout=0):
    """Endless, shuffled, augmented batches of the train split, starting at batch `start_step` of the stream.

    Batches are full (drop_remainder), and batch k is the same for any `start_step` <= k (see the module doc). The
    last `holdout` examples of the split are left out (they are `holdout_dataset`'s).
    """
    images, labels = _train_arrays(name, data_dir)
    num_examples = int(labels.shape[0]) - int(holdout)
    if num_examples < batch_size:
        raise DataUnavailableError(f"dataset '{name}' keeps {num_examples} train examples after a holdout of "
                                   f"{holdout}: fewer than one batch of {batch_size}")
    images, labels = images[:num_examples], labels[:num_examples]

    def example(position):
        epoch, offset = position // num_examples, position % num_examples
        index = tf.random.experimental.index_shuffle(
            offset, tf.stack([tf.cast(seed, tf.int64), epoch]), num_examples - 1)
        image, label = to_float(tf.gather(images, index), tf.gather(labels, index))
        if augment:
            image = augment_image(image, tf.stack([tf.cast(seed, tf.int64), position]))
        return image, label

    dataset = tf.data.Dataset.range(start_step * batch_size, tf.int64.max)
    dataset = dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)
    return _shard_by_data(dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def holdout_dataset(name, data_dir, batch_size, holdout, num_examples=None):
    """The last `holdout` examples of the train split (never trained on when held out), in order, batched, not
    augmented; the first `num_examples` of them if given."""
    images, labels = _train_arrays(name, data_dir)
    dataset = tf.data.Dataset.from_tensor_slices((images[-int(holdout):], labels[-int(holdout):]))
    if num_examples is not None:
        dataset = dataset.take(num_examples)
    return _shard_by_data(
        dataset.map(to_float, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE))


def first_train_images(name, data_dir, num_examples):
    """The first `num_examples` images of the train split, in order, not augmented: float32 numpy [N, H, W, C] in
    [0, 1] (the calibration images of an int8 export)."""
    dataset = _load_split(name, f"train[:{int(num_examples)}]", data_dir)
    images, _ = next(iter(dataset.map(to_float).batch(int(num_examples))))
    return images.numpy()


def _shard_by_data(dataset):
    """Multi-worker sharding by element: each worker builds the global batch and keeps its replicas' part, in order,
    so the global batch is the one of a single worker (file sharding would give the workers different streams)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def eval_dataset(name, data_dir, batch_size, num_examples=None):
    """The first `num_examples` images of the test split (all by default), in order, batched."""
    info = load_info(name, data_dir)
    dataset = _load_split(name, info.test_split, data_dir)
    if num_examples is not None:
        dataset = dataset.take(num_examples)
    return _shard_by_data(
        dataset.map(to_float, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE))
