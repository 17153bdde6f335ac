"""A folder of labelled images (`--dataset=folder:PATH`) as a tensorflow-datasets dataset, prepared once.

The folder holds `train/<class>/<image>`, and `test/<class>/<image>` or `val/<class>/<image>` (the layout that
keras.utils.image_dataset_from_directory and tfds.ImageFolder read). Classes are the sub-folders of train/, in sorted
order (label i is the i-th); images are the files ending in .bmp, .gif, .jpeg, .jpg or .png (any case) anywhere below
a class folder, other files are ignored. Without test/ and val/, a fraction of each class's train images (chosen with
seed 0, the same for every run) is the test split; with both, test/ is the evaluation split and val/ a validation
split that nothing reads.

Preparing decodes every image once, checks it, resizes it to the source's image size (bilinear with antialiasing, the
aspect ratio not kept; images of that size are stored unchanged) and writes the splits in tfds' format into
`<data_dir>/image_folders/<folder name>-<fingerprint>/`, so the train stream, selection, evaluation and export read it
as they read CIFAR-10. The fingerprint hashes the folder's path, every image file's path, size and modification time,
the image size and the test fraction: a changed folder is prepared again, an unchanged one never. tfds.ImageFolder was
not used: it decodes the files at every read, does not resize, and takes classes from every split (a class only in
test/ would get a label and no training image).

Each problem with the folder is a FolderError of one line naming the folder or the file: no train/ folder, fewer than
two classes, a class without images, a class only in test/ or val/, an unreadable image, an image whose channel count
differs from the first image's, images of different sizes without an image size to resize them to.
"""

import hashlib
import os
import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mtard_tf.errors import UserError

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# Split folders in the order they are looked for: the first of test/ and val/ present is the evaluation split.
SPLIT_FOLDERS = (("train", "train"), ("test", "test"), ("val", "validation"))
RESIZE_METHOD = "bilinear"  # with antialiasing: downscaled images are averaged, not aliased
HOLDOUT_SEED = 0  # the test split drawn from train/ when the folder has none: the same for every run
PREPARED_DIR = "image_folders"  # under --data_dir


class FolderError(UserError):
    """The image folder cannot be read as a labelled dataset."""


def _images_below(directory):
    """The image files below `directory`, sorted by their path relative to it."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        found += [os.path.join(root, name) for name in sorted(names) if name.lower().endswith(IMAGE_SUFFIXES)]
    return found


def has_evaluation_folder(root):
    """Whether the folder has a test/ or val/ folder; without one, scan holds a fraction of train/ out as the test
    split."""
    return any(os.path.isdir(os.path.join(root, folder)) for folder, split in SPLIT_FOLDERS if split != "train")


def _class_folders(split_dir):
    return sorted(name for name in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, name)))


def scan(source):
    """(class names, {split: [(image path, label)]}) of the folder, checked for the problems that need no decoding.

    With neither test/ nor val/, round(test_fraction x n) of each class's n train images (at most n - 1) form the
    test split, chosen by a permutation seeded with HOLDOUT_SEED."""
    root = source.path
    if not os.path.isdir(root):
        raise FolderError(f"--dataset=folder:{root}: the folder does not exist")
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise FolderError(f"{root} has no train/ folder: expected {root}/train/<class>/<image> and "
                          f"{root}/test/<class>/<image> (or val/)")
    classes = _class_folders(train_dir)
    if len(classes) < 2:
        raise FolderError(f"{train_dir} has {len(classes)} class folder(s): a classifier needs at least two "
                          "(one sub-folder of images per class)")
    labels = {name: label for label, name in enumerate(classes)}
    splits = {}
    for folder, split in SPLIT_FOLDERS:
        split_dir = os.path.join(root, folder)
        if not os.path.isdir(split_dir):
            continue
        files = []
        for name in _class_folders(split_dir):
            class_dir = os.path.join(split_dir, name)
            if name not in labels:
                raise FolderError(f"{class_dir}: class '{name}' has no train folder ({os.path.join(train_dir, name)})"
                                  f", so a model cannot learn it")
            images = _images_below(class_dir)
            if not images:
                raise FolderError(f"{class_dir} has no images ({', '.join(IMAGE_SUFFIXES)} files)")
            files += [(path, labels[name]) for path in images]
        splits[split] = files
    if not has_evaluation_folder(root):
        splits["train"], splits["test"] = _hold_out(splits["train"], len(classes), source.test_fraction)
    return tuple(classes), splits


def _hold_out(files, num_classes, fraction):
    rng = np.random.default_rng(HOLDOUT_SEED)
    train, test = [], []
    for label in range(num_classes):
        members = [item for item in files if item[1] == label]
        chosen = set(rng.permutation(len(members))[:min(round(fraction * len(members)), len(members) - 1)].tolist())
        train += [item for i, item in enumerate(members) if i not in chosen]
        test += [item for i, item in enumerate(members) if i in chosen]
    return train, test


def decode(path):
    """The image file as uint8 [H, W, C] in its own channel count (GIF: the first frame)."""
    try:
        return tf.io.decode_image(tf.io.read_file(path), expand_animations=False).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        raise FolderError(f"image {path} is not a readable BMP, GIF, JPEG or PNG file") from None


def image_shape(source, first_image_path):
    """(H, W, C): the source's image size (or the first image's own) and the first image's channel count."""
    first = decode(first_image_path)
    height, width = source.image_size or first.shape[:2]
    return int(height), int(width), int(first.shape[2])


def fingerprint(source, splits):
    """Hex digest of what the prepared dataset depends on (see the module doc)."""
    digest = hashlib.sha256(repr((source.path, tuple(source.image_size), source.test_fraction)).encode())
    for split in sorted(splits):
        for path, label in splits[split]:
            stat = os.stat(path)
            digest.update(f"{split}\0{os.path.relpath(path, source.path)}\0{label}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


class PreparedImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The tfds builder of one image folder: its splits as uint8 images of one shape, labelled by class folder."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "An image folder's train/ and test/ or val/ splits, resized to one size."}

    def __init__(self, *, source, data_dir=None, **kwargs):
        self.source = source
        self.class_names, self.files = scan(source)
        self.shape = image_shape(source, self.files["train"][0][0])
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(source.path.rstrip(os.sep))) or "folder"
        root = os.path.join(data_dir or os.path.expanduser("~/tensorflow_datasets"), PREPARED_DIR,
                            f"{slug}-{fingerprint(source, self.files)}")
        super().__init__(data_dir=root, **kwargs)

    def _info(self):
        height, width, channels = self.shape
        resize = (f"resized to {height}x{width} ({RESIZE_METHOD} with antialiasing)" if self.source.image_size
                  else "at their own size")
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"The images of {self.source.path}, {resize}; classes from its train/ sub-folders.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=self.shape),
                "label": tfds.features.ClassLabel(names=self.class_names),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(files) for split, files in self.files.items()}

    def _generate_examples(self, files):
        for path, label in files:
            yield os.path.relpath(path, self.source.path), {"image": self.read_image(path), "label": label}

    def read_image(self, path):
        """The file as uint8 self.shape: decoded, channels checked against the first image's, resized if needed."""
        image = decode(path)
        height, width, channels = self.shape
        if image.shape[2] != channels:
            raise FolderError(f"image {path} has {image.shape[2]} channel(s), the folder's first image "
                              f"({self.files['train'][0][0]}) has {channels}: give every image the same channel "
                              "count (all RGB or all grayscale)")
        if image.shape[:2] == (height, width):
            return image
        if not self.source.image_size:
            raise FolderError(f"image {path} is {image.shape[1]}x{image.shape[0]} (width x height), the folder's "
                              f"first image is {width}x{height}: give --image_size=HEIGHT,WIDTH to resize them all")
        resized = tf.image.resize(image, (height, width), method=RESIZE_METHOD, antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()
