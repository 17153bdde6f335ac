"""Datasets besides CIFAR: Tiny-ImageNet built from a miniature tiny-imagenet-200/ folder the tests write (3 classes,
64x64 JPEGs), its folder errors, a whole run on it; and another tfds dataset (svhn_cropped) on mock data."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from support import ROOT, write_mock_metadata, write_teacher_files
from mtard_tf import config as config_lib
from mtard_tf.data import datasets
from mtard_tf.errors import UserError
from mtard_tf.models import architectures

WNIDS = ("n01443537", "n01629819", "n01641577")
WORDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander, Salamandra salamandra",
         "n01641577": "bullfrog, Rana catesbeiana"}
TRAIN_PER_CLASS, VALIDATION_PER_CLASS = 4, 2


def brightness(label):
    """Every image of class `label` is about this grey level, so a label can be checked against its image."""
    return 40 + 80 * label


def write_jpeg(path, label, rng, channels=3):
    pixels = np.clip(rng.normal(brightness(label), 4, (64, 64, channels)), 0, 255).astype(np.uint8)
    tf.io.write_file(path, tf.io.encode_jpeg(pixels))


def write_tiny_imagenet(parent):
    """A miniature of the unzipped tiny-imagenet-200.zip in `parent`: 3 classes, 4 train and 2 validation images each
    (the first train image of each class grayscale, as some real ones are), an unlabelled test/ and the words of a
    class not in wnids.txt. Returns the tiny-imagenet-200 folder."""
    folder = os.path.join(str(parent), "tiny-imagenet-200")
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "val", "images"))
    os.makedirs(os.path.join(folder, "test", "images"))
    with open(os.path.join(folder, "wnids.txt"), "w") as f:
        f.write("".join(f"{wnid}\n" for wnid in WNIDS))
    with open(os.path.join(folder, "words.txt"), "w") as f:
        f.write("n00001740\tentity\n" + "".join(f"{wnid}\t{WORDS[wnid]}\n" for wnid in WNIDS))
    for label, wnid in enumerate(WNIDS):
        images = os.path.join(folder, "train", wnid, "images")
        os.makedirs(images)
        for i in range(TRAIN_PER_CLASS):
            write_jpeg(os.path.join(images, f"{wnid}_{i}.JPEG"), label, rng, channels=1 if i == 0 else 3)
        with open(os.path.join(folder, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            f.write(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    annotations = []
    for index in range(len(WNIDS) * VALIDATION_PER_CLASS):
        label = index % len(WNIDS)
        write_jpeg(os.path.join(folder, "val", "images", f"val_{index}.JPEG"), label, rng)
        annotations.append(f"val_{index}.JPEG\t{WNIDS[label]}\t0\t0\t63\t63\n")
    with open(os.path.join(folder, "val", "val_annotations.txt"), "w") as f:
        f.writelines(annotations)
    write_jpeg(os.path.join(folder, "test", "images", "test_0.JPEG"), 0, rng)
    return folder


@pytest.fixture
def tiny_imagenet_folder(tmp_path):
    return write_tiny_imagenet(tmp_path / "manual")


def test_tiny_imagenet_is_built_from_the_folder_with_its_classes_and_labels(tiny_imagenet_folder, tmp_path):
    data_dir = str(tmp_path / "tfds")
    datasets.prepare("tiny_imagenet", data_dir, manual_dir=os.path.dirname(tiny_imagenet_folder))  # the zip's parent
    info = datasets.load_info("tiny_imagenet", data_dir)
    assert info == datasets.DatasetInfo(
        name="tiny_imagenet", num_classes=3, image_shape=(64, 64, 3), class_names=tuple(WORDS[w] for w in WNIDS),
        num_train=3 * TRAIN_PER_CLASS, num_test=3 * VALIDATION_PER_CLASS, test_split="validation")
    for images, labels in datasets.eval_dataset("tiny_imagenet", data_dir, 32):
        assert sorted(labels.numpy()) == [0, 0, 1, 1, 2, 2]
        np.testing.assert_allclose(images.numpy().mean(axis=(1, 2, 3)) * 255, brightness(labels.numpy()), atol=3)
    images, labels = next(iter(datasets.train_dataset("tiny_imagenet", data_dir, 12, augment=False)))
    assert images.shape == (12, 64, 64, 3) and sorted(labels.numpy()) == sorted(list(range(3)) * TRAIN_PER_CLASS)
    np.testing.assert_allclose(images.numpy().mean(axis=(1, 2, 3)) * 255, brightness(labels.numpy()), atol=3)
    shutil.rmtree(tiny_imagenet_folder)
    datasets.prepare("tiny_imagenet", data_dir)  # built once: the folder is not needed any more


def break_folder(folder, problem):
    """Makes `problem` happen in the folder; returns the path the error must name."""
    if problem == "no_wnids":
        os.remove(os.path.join(folder, "wnids.txt"))
        return os.path.join(folder, "wnids.txt")
    if problem == "missing_class_folder":
        shutil.rmtree(os.path.join(folder, "train", WNIDS[1]))
        return os.path.join(folder, "train", WNIDS[1], "images")
    if problem == "unknown_wnid_in_annotations":
        with open(os.path.join(folder, "val", "val_annotations.txt"), "a") as f:
            f.write("val_0.JPEG\tn09999999\t0\t0\t63\t63\n")
        return os.path.join(folder, "val", "val_annotations.txt") + " line 7: class n09999999"
    if problem == "unreadable_image":
        path = os.path.join(folder, "val", "images", "val_4.JPEG")
        with open(path, "wb") as f:
            f.write(b"not an image")
        return path
    raise ValueError(problem)


@pytest.mark.parametrize("problem", ["no_wnids", "missing_class_folder", "unknown_wnid_in_annotations",
                                     "unreadable_image"])
def test_a_broken_folder_is_one_line_naming_the_file_and_builds_nothing(tiny_imagenet_folder, tmp_path, problem):
    named = break_folder(tiny_imagenet_folder, problem)
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(UserError) as raised:
        datasets.prepare("tiny_imagenet", data_dir, manual_dir=tiny_imagenet_folder)
    message = str(raised.value)
    assert named in message and "\n" not in message
    assert "train" not in tfds.builder("tiny_imagenet", data_dir=data_dir).info.splits


def test_a_missing_manual_directory_says_how_to_provide_the_folder(tmp_path):
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(datasets.DataUnavailableError) as raised:
        datasets.prepare("tiny_imagenet", data_dir, download=False)
    message = str(raised.value)
    assert os.path.join(data_dir, "downloads", "manual") in message and "\n" not in message
    assert "tiny-imagenet-200.zip" in message and "--manual_dir" in message


def test_a_manual_directory_for_a_dataset_tfds_downloads_itself_is_an_error(tmp_path):
    write_mock_metadata(str(tmp_path), "svhn_cropped", 64, 32)
    with tfds.testing.mock_data(num_examples=64, data_dir=str(tmp_path)):
        with pytest.raises(UserError, match="--manual_dir applies to .* tensorflow-datasets gets 'svhn_cropped'"):
            datasets.prepare("svhn_cropped", None, download=False, manual_dir=str(tmp_path))


def main_command(*flags):
    """`python -m mtard_tf.main *flags` as users run it (real tfds, no mock data)."""
    return subprocess.run([sys.executable, "-m", "mtard_tf.main", *flags], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"), timeout=600)


def test_the_command_line_gives_a_broken_folder_as_its_one_error_line(tiny_imagenet_folder, tmp_path):
    named = break_folder(tiny_imagenet_folder, "unreadable_image")
    result = main_command("--mode=distill", "--dataset=tiny_imagenet", f"--manual_dir={tiny_imagenet_folder}",
                          f"--data_dir={tmp_path / 'tfds'}", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: image {named} is not a readable JPEG, PNG, GIF or BMP file"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_whole_run_on_tiny_imagenet_distills_evaluates_and_exports(tiny_imagenet_folder, tmp_path):
    """The student is 16 channels wide: oneDNN's 1x1 stride-2 convolution weight gradient (the ResNet shortcut) corrupts
    memory on 64x64 inputs of fewer than 16 channels (TensorFlow 2.21), which no real architecture has."""
    clean, robust = write_teacher_files(tmp_path, num_classes=3, input_shape=(64, 64, 3))
    model_dir, export_dir = tmp_path / "run", tmp_path / "saved_models"
    result = main_command(
        "--dataset=tiny_imagenet", f"--manual_dir={tiny_imagenet_folder}", f"--data_dir={tmp_path / 'tfds'}",
        f"--model_dir={model_dir}", f"--export_dir={export_dir}", "--model_name=tiny", f"--clean_teacher={clean}",
        f"--robust_teacher={robust}", "--student=resnet56:depth=8,width=16", "--epochs=1", "--steps_per_epoch=2",
        "--batch_size=4", "--validation_steps=1", "--attack_steps=1", "--eval_attack_steps=1",
        "--attacks=clean,fgsm", "--num_eval_examples=4", "--eval_batch_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dataset 'tiny_imagenet': first use, building it in" in result.stdout
    with open(model_dir / "eval" / "report.json") as f:
        report = json.load(f)
    assert set(report["attacks"]) == {"clean", "fgsm"} and report["attacks"]["clean"]["num_examples"] == 4
    served = tf.saved_model.load(str(export_dir / "tiny" / "1")).signatures["predict_encoded"]
    jpeg = tf.io.read_file(os.path.join(tiny_imagenet_folder, "val", "images", "val_0.JPEG"))
    outputs = served(image_bytes=tf.stack([jpeg]))
    assert outputs["logits"].shape == (1, 3)
    assert outputs["class_name"].numpy()[0].decode() in WORDS.values()


@pytest.mark.parametrize("spec", ["resnet18:width=2,blocks=1", "resnet56:depth=8,width=2",
                                  "wrn34_10:depth=10,widen=1", "mobilenetv2:width_multiplier=0.25,max_blocks=1"])
def test_every_architecture_takes_64x64_images(spec):
    """The CIFAR architectures end in global average pooling, so they take any image size."""
    model = architectures.build_model(spec, num_classes=200, input_shape=(64, 64, 3))
    assert model(np.zeros((1, 64, 64, 3), np.float32), training=False).shape == (1, 200)


def test_another_tfds_image_classification_dataset_svhn_cropped(tmp_path):
    write_mock_metadata(str(tmp_path), "svhn_cropped", 64, 32)
    with tfds.testing.mock_data(num_examples=64, data_dir=str(tmp_path)):
        datasets.prepare("svhn_cropped", None, download=False)
        info = datasets.load_info("svhn_cropped")
        assert (info.num_classes, info.image_shape, info.test_split) == (10, (32, 32, 3), "test")
        images, labels = next(iter(datasets.train_dataset("svhn_cropped", None, 8)))
        assert images.shape == (8, 32, 32, 3) and labels.shape == (8,)
        assert sum(int(labels.shape[0]) for _, labels in datasets.eval_dataset("svhn_cropped", None, 8, 16)) == 16


def test_a_dataset_without_a_test_or_validation_split_is_one_line(tmp_path):
    """eurosat (64x64, 10 classes) has a train split only: nothing to evaluate on."""
    builder = tfds.builder("eurosat", data_dir=str(tmp_path))
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name="train", shard_lengths=[16], num_bytes=0, filename_template=None)]))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    with pytest.raises(datasets.DataUnavailableError, match="^dataset 'eurosat' has no test or validation split to "
                                                        r"evaluate on \(its splits: train\)$"):
        datasets.load_info("eurosat", str(tmp_path))


def test_the_tiny_imagenet_preset_configures_a_tiny_imagenet_run():
    preset = config_lib.read_flagfile(os.path.join(ROOT, "flags", "tiny_imagenet.cfg"))
    config = config_lib.make(**preset)
    assert config.data.dataset == "tiny_imagenet" and config.data.manual_dir is None
    teachers = (config.clean_teacher.arch, config.robust_teacher.arch)
    assert teachers == ("resnet18", "wrn34_10") and config.balance.kl_scale == 10
