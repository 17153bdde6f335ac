"""Tiny-ImageNet as a tensorflow-datasets builder (`tiny_imagenet`), built from the tiny-imagenet-200/ folder users
download.

Importing this module registers the dataset name with tfds (mtard_tf.data imports it). The folder is the unzipped
http://cs231n.stanford.edu/tiny-imagenet-200.zip (Le & Yang, "Tiny ImageNet Visual Recognition Challenge", 2015):
`wnids.txt` (the 200 classes, in label order), `words.txt` (every WordNet id's name), `train/<wnid>/images/*.JPEG`
(500 per class) and `val/images/*.JPEG` labelled by `val/val_annotations.txt` (50 per class). Its `test/` images carry
no labels and are not read, so the dataset has a train split (100,000 images) and a validation split (10,000), and
the validation split serves as the test split (data.load_info takes `validation` where a dataset has no `test`).

Every image is decoded while the dataset is built, as RGB (a few of the JPEGs are grayscale) and checked to be 64x64,
so a broken file stops the build with its name instead of failing later inside a training run. Each problem with the
folder is a FolderError of one line naming the file.
"""

import os

import tensorflow as tf
import tensorflow_datasets as tfds

from mtard_tf.errors import UserError

IMAGE_SHAPE = (64, 64, 3)
FOLDER_NAME = "tiny-imagenet-200"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
INSTRUCTIONS = (f"download http://cs231n.stanford.edu/{FOLDER_NAME}.zip and unzip it in the manual directory "
                f"(--manual_dir, default <data_dir>/downloads/manual/), or pass --manual_dir=<the unzipped "
                f"{FOLDER_NAME} folder>")


class FolderError(UserError):
    """The Tiny-ImageNet folder is missing a file or has one that cannot be used."""


def find_folder(manual_dir):
    """The folder holding wnids.txt: `manual_dir` itself, or its tiny-imagenet-200/ (the zip unpacked in it)."""
    candidates = [os.fspath(manual_dir), os.path.join(os.fspath(manual_dir), FOLDER_NAME)]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "wnids.txt")):
            return folder
    raise FolderError(f"no Tiny-ImageNet folder: neither {os.path.join(candidates[0], 'wnids.txt')} nor "
                      f"{os.path.join(candidates[1], 'wnids.txt')} exists: {INSTRUCTIONS}")


def _lines(path):
    if not os.path.isfile(path):
        raise FolderError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except UnicodeDecodeError:
        raise FolderError(f"{path} is not a UTF-8 text file") from None


def read_wnids(folder):
    """The class ids of wnids.txt, one a line; label i is the i-th."""
    path = os.path.join(folder, "wnids.txt")
    wnids = [line.strip() for line in _lines(path) if line.strip()]
    if not wnids:
        raise FolderError(f"{path} lists no classes")
    if len(set(wnids)) != len(wnids):
        raise FolderError(f"{path} lists a class twice")
    return wnids


def class_names(folder, wnids):
    """The words.txt entry (`<wnid>\\t<names>`) of each wnid; an entry shared by two classes gets its wnid appended,
    since class names must be unique."""
    path = os.path.join(folder, "words.txt")
    words = dict(line.split("\t", 1) for line in _lines(path) if "\t" in line)
    missing = [wnid for wnid in wnids if wnid not in words]
    if missing:
        raise FolderError(f"{path} has no entry for {missing[0]}, a class of wnids.txt")
    names = [words[wnid].strip() for wnid in wnids]
    repeated = {name for name in names if names.count(name) > 1}
    return [f"{name} ({wnid})" if name in repeated else name for name, wnid in zip(names, wnids)]


def train_files(folder, wnids):
    """[(image path, label)] of train/<wnid>/images/, in label then file name order."""
    files = []
    for label, wnid in enumerate(wnids):
        images = os.path.join(folder, "train", wnid, "images")
        if not os.path.isdir(images):
            raise FolderError(f"{images} does not exist (the train images of class {wnid} of wnids.txt)")
        names = sorted(name for name in os.listdir(images) if name.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise FolderError(f"{images} has no images")
        files += [(os.path.join(images, name), label) for name in names]
    return files


def validation_files(folder, wnids):
    """[(image path, label)] of val/val_annotations.txt (`<file>\\t<wnid>\\t<box>` lines), in its order."""
    path = os.path.join(folder, "val", "val_annotations.txt")
    labels = {wnid: label for label, wnid in enumerate(wnids)}
    files, annotated = [], set()
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise FolderError(f"{path} line {number}: expected '<image file>\\t<wnid>...', got '{line}'")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in labels:
            raise FolderError(f"{path} line {number}: class {wnid} is not in wnids.txt")
        if name in annotated:
            raise FolderError(f"{path} line {number}: {name} is annotated twice")
        annotated.add(name)
        files.append((os.path.join(folder, "val", "images", name), labels[wnid]))
    if not files:
        raise FolderError(f"{path} has no annotations")
    return files


def read_image(path):
    """The image file as uint8 [64, 64, 3] (grayscale made RGB)."""
    if not os.path.isfile(path):
        raise FolderError(f"image {path} does not exist")
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()
    except tf.errors.InvalidArgumentError:
        raise FolderError(f"image {path} is not a readable JPEG, PNG, GIF or BMP file") from None
    if image.shape != IMAGE_SHAPE:
        raise FolderError(f"image {path} is {image.shape[1]}x{image.shape[0]}, Tiny-ImageNet's images are 64x64")
    return image


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny-ImageNet-200 from the folder in the manual directory (tfds' DownloadConfig.manual_dir)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Train and validation splits of tiny-imagenet-200.zip."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self):
        # The class count and names come from the folder (its wnids.txt), so they are set in _split_generators; a
        # prepared dataset restores them from its label.labels.txt.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tiny-ImageNet-200: 64x64 images of 200 ImageNet classes; the validation split is the "
                        "labelled held-out set.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=IMAGE_SHAPE),
                "label": tfds.features.ClassLabel(),
            }),
            supervised_keys=("image", "label"),
            homepage="http://cs231n.stanford.edu/",
            citation="@article{le2015tiny, title={Tiny ImageNet Visual Recognition Challenge}, author={Le, Ya and "
                     "Yang, Xuan}, journal={CS 231N}, year={2015}}",
        )

    def _split_generators(self, dl_manager):
        folder = find_folder(dl_manager.manual_dir)
        wnids = read_wnids(folder)
        self.info.features["label"].names = class_names(folder, wnids)
        return {"train": self._generate_examples(train_files(folder, wnids)),
                "validation": self._generate_examples(validation_files(folder, wnids))}

    def _generate_examples(self, files):
        for path, label in files:
            yield os.path.basename(path), {"image": read_image(path), "label": label}
