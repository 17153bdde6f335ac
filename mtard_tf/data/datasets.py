"""Image-classification data from tensorflow-datasets: float32 images in [0, 1], integer labels.

Shapes, class counts and class names come from the dataset's own info. The training stream is a pure function of
(seed, position): position p = e * N + i of the stream is example index_shuffle(i, (seed, e)) of the train split (a
fresh permutation every epoch e), augmented (pad 4, random crop back to the image size, random horizontal flip)
with stateless random ops seeded by (seed, p). So a run resumed at step s sees exactly the batches an uninterrupted
run sees, whatever the parallelism of the map, and resuming costs nothing. tf.data's stateful shuffle was not used
because its order depended on process state.
(Keras' RandomCrop/RandomFlip layers draw from a stateful seed generator, which a parallel tf.data map consumes in
a nondeterministic order, and RandomCrop uses one offset per batch; hence tf.image's stateless ops.)

The stream reads the train split from one of two sources, which give identical batches (the same permutation picks the
same example, decoded to the same uint8 pixels): `memory` holds the whole split as a uint8 tensor (150 MB for CIFAR,
1.2 GB for Tiny-ImageNet); `disk`, for splits larger than memory, reads the examples of each chunk of permuted
indices from the dataset's ArrayRecord files (the random-access files of tfds' `data_source`) and decodes them in the
tf.data map. `add_array_record` writes those files beside a prepared dataset's tfrecord files.

Evaluation uses the dataset's test split, or its validation split where it has none (Tiny-ImageNet, whose test
images carry no labels). Datasets built from files the user downloads (tfds' manual datasets, e.g. `tiny_imagenet`,
registered by importing mtard_tf.data.tiny_imagenet) are built from the manual directory on first use, and a folder of
the user's labelled images (`folder:PATH`, an ImageFolderSource: mtard_tf.data.image_folder) is prepared from the
folder on first use; every function here takes either kind of name.
"""

import atexit
import contextlib
import dataclasses
import functools
import math
import os
import threading
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import file_adapters

from mtard_tf.data import image_folder
from mtard_tf.data import tiny_imagenet  # noqa: F401 - registers the tfds dataset `tiny_imagenet`
from mtard_tf.data.source import ImageFolderSource
from mtard_tf.errors import UserError

TRAIN_SOURCES = ("memory", "disk")  # where train_dataset reads the split; config's --train_source adds "auto"
ARRAY_RECORD = file_adapters.FileFormat.ARRAY_RECORD


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
    """The tfds builder of a dataset name or of an ImageFolderSource (image_folder.PreparedImageFolder)."""
    if isinstance(name, ImageFolderSource):
        return _folder_builder(name, data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DataUnavailableError(f"unknown tensorflow-datasets dataset '{name}'") from error
    return builder


@functools.lru_cache(maxsize=8)
def _folder_builder(source, data_dir):
    """One builder per folder and data_dir in a process: it scans the folder when made."""
    return image_folder.PreparedImageFolder(source=source, data_dir=data_dir)


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
    if isinstance(name, ImageFolderSource):
        if manual_dir:
            raise UserError("--manual_dir applies to tiny_imagenet; a folder:PATH dataset is read from PATH")
        _prepare_folder(builder)
        return
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


def _prepare_folder(builder):
    """Writes an image folder's splits in tfds' format on first use (image_folder's module doc)."""
    if "train" in builder.info.splits:
        return
    source, (height, width, channels) = builder.source, builder.shape
    counts = ", ".join(f"{len(files)} {split}" for split, files in builder.files.items())
    held_out = (f"; no test/ or val/ folder, so {source.test_fraction:g} of each class's train images (seed "
                f"{image_folder.HOLDOUT_SEED}) are the test split"
                if not image_folder.has_evaluation_folder(source.path) else "")
    size = (f"resized to {height}x{width} ({image_folder.RESIZE_METHOD} with antialiasing)" if source.image_size
            else f"{height}x{width}")
    print(f"dataset '{source}': first use, preparing {len(builder.class_names)} classes ({counts} images, {size}, "
          f"{channels} channel(s){held_out}) into {builder.data_dir}", flush=True)
    builder.download_and_prepare()


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


def _add_array_record_command(name, data_dir):
    command = f"python -m mtard_tf.tools.add_array_record --dataset={name}"
    if isinstance(name, ImageFolderSource) and name.image_size:
        command += f" --image_size={name.image_size[0]},{name.image_size[1]}"
    return command + (f" --data_dir={data_dir}" if data_dir else "")


def _without_tf_data_files(name, data_dir):
    builder = _builder(name, data_dir)
    return DataUnavailableError(
        f"dataset '{name}' in {builder.data_dir} has no tfrecord files, which tf.data reads (the test split, the "
        f"in-memory train split): prepare it in tfds' default format, then add the ArrayRecord files with "
        f"`{_add_array_record_command(name, data_dir)}`")


def _load_split(name, split, data_dir):
    try:
        return _builder(name, data_dir).as_dataset(split=split, as_supervised=True)
    except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as error:
        raise _unavailable(name, data_dir) from error
    except NotImplementedError as error:  # tfds: "`.as_dataset()` not implemented for ArrayRecord files"
        raise _without_tf_data_files(name, data_dir) from error


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
        images, labels = _builder(name, data_dir).as_dataset(split="train", as_supervised=True, batch_size=-1)
    except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as error:
        raise _unavailable(name, data_dir) from error
    except NotImplementedError as error:
        raise _without_tf_data_files(name, data_dir) from error
    return images, labels


def train_split_bytes(info):
    """Bytes of the whole train split held in memory as uint8 pixels (what the `memory` source takes)."""
    return info.num_train * math.prod(info.image_shape)


def train_source(name, data_dir, choice, in_memory_limit_gb):
    """Where the train stream reads the split from: "memory" or "disk" (see the module doc).

    `choice` "auto" is disk when the split takes more than `in_memory_limit_gb` (10^9 bytes) as uint8, else memory;
    "memory" and "disk" force one. Disk needs the dataset's ArrayRecord files: without them it is a
    DataUnavailableError of one line naming the command that adds them, never a fall back to memory.
    """
    if choice not in ("auto", *TRAIN_SOURCES):
        raise ValueError(f"unknown train source '{choice}', expected auto, memory or disk")
    if choice == "memory":
        return "memory"
    size = train_split_bytes(load_info(name, data_dir))
    if choice == "auto" and size <= in_memory_limit_gb * 1e9:
        return "memory"
    why = ("with --train_source=disk" if choice == "disk" else
           f"because its train split takes {size / 1e9:.3g} GB as uint8, above --in_memory_limit_gb="
           f"{in_memory_limit_gb:g} (or force --train_source=memory)")
    _train_records(name, data_dir, why)
    return "disk"


def _prepared_files(name, data_dir):
    """The prepared dataset's builder as its files describe it (tfds.builder_from_directory). A builder made from
    the dataset's code (a registered dataset such as cifar10) does not see the formats added in its
    dataset_info.json's alternativeFileFormats (tfds 4.9.10: DatasetInfo.read_from_directory restores the proto
    field but not the list that available_file_formats reads)."""
    builder = _builder(name, data_dir)
    if "train" not in builder.info.splits:
        raise _unavailable(name, data_dir)
    return tfds.builder_from_directory(builder.data_dir)


def _train_records(name, data_dir, why="with --train_source=disk"):
    """(the dataset's tfds info, its train split's ArrayRecordSplit)."""
    builder = _prepared_files(name, data_dir)
    if ARRAY_RECORD not in builder.info.available_file_formats():
        raise DataUnavailableError(
            f"dataset '{name}' in {builder.data_dir} has no ArrayRecord files, which the train split is read from "
            f"{why}: add them with `{_add_array_record_command(name, data_dir)}`")
    return builder.info, ArrayRecordSplit(builder.info.splits["train"])


class _ReadsAtExit:
    """Holds the interpreter's exit until tf.data's threads have stopped calling ArrayRecordSplit.read.

    Why: a disk stream whose iterator is still alive when the process exits goes on filling its buffers from
    TensorFlow's threads, and each read enters Python (the numpy_function of `_read_by_index`). A thread that asks
    for the GIL while the interpreter finalizes is ended by Python (pthread_exit) in the middle of TensorFlow's C++
    frames, which aborts the process ("terminate called without an active exception", status 134: 5 of 6 runs of
    tests/test_data_sources.py's live-stream script without this guard) or leaves it hanging (1 of 2 runs when the
    wait below does not require a quiet period).
    Why a wait and not a cure: the cure is no Python in the read (neither TensorFlow nor array_record ships an
    ArrayRecord reader op) or every iterator deleted before exit, which stops tf.data's threads, but the iterators
    belong to the caller (Keras' fit, a user's loop) and are still referenced when atexit runs.
    How long: with no consumer the buffers fill within milliseconds, so the exit waits until no read has run for
    `quiet` seconds, at most `limit` seconds. Measured with that script: exits of 0.06-0.13 s with quiet=0.1 (12 of
    12 runs normal, also with quiet=0.05); `limit` only bounds a stream that a live thread still consumes."""

    def __init__(self, quiet=0.1, limit=2.0):
        self.quiet, self.limit = quiet, limit
        self.lock = threading.Lock()
        self.active, self.last = 0, 0.0
        self.registered = False

    def register(self):
        with self.lock:
            if not self.registered:
                atexit.register(self.wait)
                self.registered = True

    @contextlib.contextmanager
    def reading(self):
        with self.lock:
            self.active += 1
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1
                self.last = time.monotonic()

    def wait(self):
        deadline = time.monotonic() + self.limit
        while time.monotonic() < deadline:
            with self.lock:
                if not self.active and time.monotonic() - self.last > self.quiet:
                    return
            time.sleep(self.quiet / 5)


_READS = _ReadsAtExit()


class ArrayRecordSplit:
    """The serialized examples of a prepared split by index, from its ArrayRecord shards (the files tfds'
    `data_source` reads). A read of many indices is one call per shard of array_record's thread-safe reader;
    tfds' own batched read (`data_source.__getitems__`) runs each in a Python thread pool, which refuses work once
    the interpreter starts exiting, and one by one it reads about 10 times fewer examples per second (CIFAR-10
    here)."""

    def __init__(self, split):
        template = split.filename_template.replace(filetype_suffix=ARRAY_RECORD.value)
        self.paths = [os.fspath(path) for path in template.sharded_filepaths(split.num_shards)]
        self.ends = np.cumsum(split.shard_lengths)
        self.readers = [None] * len(self.paths)  # opened on first use: a split may have thousands of shards
        self.lock = threading.Lock()
        _READS.register()

    def __len__(self):
        return int(self.ends[-1])

    def reader(self, shard):
        with self.lock:
            if self.readers[shard] is None:
                self.readers[shard] = array_record_module.ArrayRecordReader(
                    self.paths[shard], options="readahead_buffer_size:0", file_reader_buffer_size=32768)
            return self.readers[shard]

    def read(self, indices):
        """The serialized examples at `indices` (int numpy array), in that order: a numpy array of bytes."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices outside [0, {len(self)})")
        shards = np.searchsorted(self.ends, indices, side="right")
        records = np.empty(indices.shape, dtype=object)
        with _READS.reading():
            for shard in np.unique(shards):
                where = shards == shard
                start = self.ends[shard - 1] if shard else 0
                records[where] = self.reader(shard).read((indices[where] - start).tolist())
        return records


def _read_by_index(keyed_indices, info, records, chunk):
    """(key, index) elements -> (key, uint8 image, label) of example `index` of the train split (`records`, an
    ArrayRecordSplit): the serialized examples of each chunk of indices are read in one numpy_function call, then
    each is decoded in the parallel tf.data map."""
    image_key, label_key = info.supervised_keys[:2]

    def read(keys, indices):
        serialized = tf.numpy_function(records.read, [indices], tf.string, name="read_train_examples")
        return keys, tf.reshape(serialized, tf.shape(indices))

    def decode(key, serialized):
        example = info.features.deserialize_example(serialized)
        return key, example[image_key], example[label_key]

    dataset = keyed_indices.batch(chunk).map(read, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)


def _check_source(source):
    if source not in TRAIN_SOURCES:
        raise ValueError(f"unknown train source '{source}', expected one of {', '.join(TRAIN_SOURCES)}")


def train_dataset(name, data_dir, batch_size, seed=0, augment=True, start_step=0, holdout=0, source="memory"):
    """Endless, shuffled, augmented batches of the train split, starting at batch `start_step` of the stream.

    Batches are full (drop_remainder), and batch k is the same for any `start_step` <= k and either `source`
    (see the module doc; `train_source` resolves --train_source). The last `holdout` examples of the split are left
    out (they are `holdout_dataset`'s).
    """
    _check_source(source)
    if source == "memory":
        images, labels = _train_arrays(name, data_dir)
        num_split = int(labels.shape[0])
    else:
        info, records = _train_records(name, data_dir)
        num_split = len(records)
    num_examples = num_split - int(holdout)
    if num_examples < batch_size:
        raise DataUnavailableError(f"dataset '{name}' keeps {num_examples} train examples after a holdout of "
                                   f"{holdout}: fewer than one batch of {batch_size}")
    seed = tf.cast(seed, tf.int64)

    def index_of(position):
        epoch, offset = position // num_examples, position % num_examples
        return tf.random.experimental.index_shuffle(offset, tf.stack([seed, epoch]), num_examples - 1)

    def example(position, image, label):
        image, label = to_float(image, label)
        if augment:
            image = augment_image(image, tf.stack([seed, position]))
        return image, label

    def gathered(position):
        index = index_of(position)
        return example(position, tf.gather(images, index), tf.gather(labels, index))

    positions = tf.data.Dataset.range(start_step * batch_size, tf.int64.max)
    if source == "memory":
        dataset = positions.map(gathered, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        dataset = _read_by_index(positions.map(lambda p: (p, index_of(p))), info, records, batch_size)
        dataset = dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)
    return _shard_by_data(dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def holdout_dataset(name, data_dir, batch_size, holdout, num_examples=None, source="memory"):
    """The last `holdout` examples of the train split (never trained on when held out), in order, batched, not
    augmented; the first `num_examples` of them if given. Read from `source` as the train stream is."""
    _check_source(source)
    if source == "memory":
        images, labels = _train_arrays(name, data_dir)
        dataset = tf.data.Dataset.from_tensor_slices((images[-int(holdout):], labels[-int(holdout):]))
    else:
        info, records = _train_records(name, data_dir)
        indices = tf.data.Dataset.range(len(records) - int(holdout), len(records))
        dataset = _read_by_index(indices.map(lambda i: (i, i)), info, records, batch_size)
        dataset = dataset.map(lambda index, image, label: (image, label))
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


def add_array_record(name, data_dir=None):
    """Writes ArrayRecord copies of a prepared dataset's tfrecord shards beside them and adds the format to its
    dataset_info.json, for the `disk` train source; tf.data keeps reading the tfrecord files. This is what
    `tfds convert_format --out_file_format=array_record` does in place, without its CLI's apache-beam dependency
    (tensorflow/datasets#5463). Returns the number of examples written (0 when the files are there already)."""
    builder = _prepared_files(name, data_dir)
    info = builder.info
    if ARRAY_RECORD in info.available_file_formats():
        return 0
    if info.file_format != file_adapters.FileFormat.TFRECORD:
        raise DataUnavailableError(f"dataset '{name}' in {builder.data_dir} is stored as {info.file_format.value}, "
                                   f"not tfrecord: prepare it with tensorflow-datasets' default format")
    writer = file_adapters.ADAPTER_FOR_FORMAT[ARRAY_RECORD]
    written = 0
    try:
        for split in info.splits.values():
            template = split.filename_template
            sources = template.sharded_filepaths(split.num_shards)
            targets = template.replace(filetype_suffix=writer.FILE_SUFFIX).sharded_filepaths(split.num_shards)
            for source, target, length in zip(sources, targets, split.shard_lengths):
                partial = f"{target}.incomplete"
                records = tf.data.TFRecordDataset(os.fspath(source)).as_numpy_iterator()
                writer.write_examples(partial, ((None, record) for record in records))
                if writer.num_examples(partial) != length:
                    raise DataUnavailableError(f"{source} holds {writer.num_examples(partial)} examples, its "
                                               f"dataset_info.json says {length}: prepare the dataset again")
                tf.io.gfile.rename(partial, os.fspath(target), overwrite=True)
                written += length
        info.add_alternative_file_format(ARRAY_RECORD)
        info.write_dataset_info_json(builder.data_dir)
    except (OSError, tf.errors.PermissionDeniedError) as error:
        raise DataUnavailableError(f"cannot write ArrayRecord files into {builder.data_dir}: "
                                   f"{getattr(error, 'strerror', None) or error}") from error
    return written
