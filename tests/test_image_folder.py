"""--dataset=folder:PATH: a folder of labelled images prepared once in tfds' format, every stage run on it, and each
broken folder refused in one line naming the file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mtard_tf import config as config_lib
from mtard_tf.data import datasets, image_folder
from mtard_tf.job import stages

from support import ROOT

CLASSES = ("ant", "bee", "cow")
# (height, width) of the images, cycled: four sizes, one of them the target size (stored unchanged).
SIZES = ((40, 30), (32, 32), (50, 64), (28, 36))


def write_image(path, value, size, channels=3):
    """A constant image of `value` (so it stays `value` after any resize): PNG, or JPEG at quality 100 (a constant
    JPEG decodes to its value exactly)."""
    image = np.full(size + (channels,), value, dtype=np.uint8)
    data = tf.io.encode_png(image) if path.endswith(".png") else tf.io.encode_jpeg(image, quality=100)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.numpy())


def write_folder(root, per_split=(("train", 6), ("test", 2))):
    """root/<split>/<class>/<k>.{png,jpg} of mixed sizes; image value = a unique id, so every image can be traced:
    {split: {value: label}}."""
    values, value = {}, 1
    for split, count in per_split:
        values[split] = {}
        for label, name in enumerate(CLASSES):
            for k in range(count):
                path = os.path.join(root, split, name, f"{k}.{'png' if k % 2 else 'jpg'}")
                write_image(path, value, SIZES[(k + label) % len(SIZES)])
                values[split][value] = label
                value += 1
    with open(os.path.join(root, "train", CLASSES[0], "notes.txt"), "w") as f:
        f.write("not an image: ignored\n")
    return str(root)


def folder_config(folder, data_dir, **values):
    return config_lib.make(dataset=f"folder:{folder}", data_dir=str(data_dir), **values)


def split_values(source, data_dir, split):
    """{image value: label} of a prepared split, each image checked to be constant."""
    found = {}
    for images, labels in datasets._load_split(source, split, data_dir).batch(64):
        for image, label in zip(images.numpy(), labels.numpy()):
            assert (image == image.flat[0]).all()
            found[int(image.flat[0])] = int(label)
    return found


def test_a_folder_is_prepared_once_with_its_classes_sizes_and_every_image(tmp_path, capsys):
    folder = write_folder(tmp_path / "images")
    source = folder_config(folder, tmp_path / "tfds", image_size=(32, 32)).data.source
    datasets.prepare(source, str(tmp_path / "tfds"))
    assert "preparing 3 classes (18 train, 6 test images, resized to 32x32" in capsys.readouterr().out
    info = datasets.load_info(source, str(tmp_path / "tfds"))
    assert (info.class_names, info.image_shape, info.num_train, info.num_test, info.test_split) == (
        CLASSES, (32, 32, 3), 18, 6, "test")
    expected = {split: values for split, values in
                {"train": range(1, 19), "test": range(19, 25)}.items()}
    for split, values in expected.items():
        labels = split_values(source, str(tmp_path / "tfds"), split)
        assert sorted(labels) == list(values)  # every image once, none from the other split
        per_class = len(values) // len(CLASSES)
        assert all(label == (value - values[0]) // per_class for value, label in labels.items())

    datasets.prepare(source, str(tmp_path / "tfds"))  # prepared: nothing is written again
    assert "preparing" not in capsys.readouterr().out
    write_image(os.path.join(folder, "train", "bee", "new.png"), 200, (32, 32))  # a changed folder is new data
    changed = folder_config(folder, tmp_path / "tfds", image_size=(32, 32)).data.source
    datasets._folder_builder.cache_clear()
    datasets.prepare(changed, str(tmp_path / "tfds"))
    assert "19 train" in capsys.readouterr().out


def test_resizing_is_bilinear_with_antialiasing_and_leaves_the_target_size_alone(tmp_path):
    folder = tmp_path / "images"
    gradient = np.tile(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], (64, 1, 3))  # 64x64, columns 0, 4, ...
    for name in CLASSES[:2]:
        os.makedirs(folder / "train" / name)
        tf.io.write_file(str(folder / "train" / name / "a.png"), tf.io.encode_png(gradient))
        write_image(str(folder / "train" / name / "b.png"), 7, (32, 32))
    source = folder_config(str(folder), tmp_path / "tfds", image_size=(32, 32), folder_test_fraction=0.5).data.source
    builder = image_folder.PreparedImageFolder(source=source, data_dir=str(tmp_path / "tfds"))
    resized = builder.read_image(str(folder / "train" / CLASSES[0] / "a.png"))
    # Halving a linear ramp with an antialiased (triangle) filter averages neighbouring columns: 4 * 2j + 2 inside,
    # the edge columns clamp.
    assert resized.shape == (32, 32, 3)
    np.testing.assert_allclose(resized[0, 1:-1, 0], 8 * np.arange(1, 31) + 2, atol=1)
    assert (builder.read_image(str(folder / "train" / CLASSES[0] / "b.png")) == 7).all()


def test_without_a_test_folder_a_seeded_fraction_of_each_class_is_held_out(tmp_path):
    folder = write_folder(tmp_path / "images", per_split=(("train", 8),))
    config = folder_config(folder, tmp_path / "tfds", image_size=(32, 32), folder_test_fraction=0.25)
    datasets.prepare(config.data.source, str(tmp_path / "tfds"))
    train = split_values(config.data.source, str(tmp_path / "tfds"), "train")
    test = split_values(config.data.source, str(tmp_path / "tfds"), "test")
    assert not set(train) & set(test)
    assert sorted(set(train) | set(test)) == list(range(1, 25))
    assert [list(test.values()).count(label) for label in range(3)] == [2, 2, 2]  # round(0.25 * 8) per class
    again = image_folder.scan(config.data.source)[1]["test"]  # the same images at every scan (seed 0)
    assert sorted(os.path.relpath(p, folder) for p, _ in again) == sorted(
        os.path.relpath(p, folder) for p, _ in image_folder.scan(config.data.source)[1]["test"])
    assert len(again) == 6


def break_folder(folder, problem):
    """Breaks a written folder; returns the text the error must name."""
    if problem == "unreadable image":
        path = os.path.join(folder, "train", "bee", "1.png")
        with open(path, "wb") as f:
            f.write(b"not a png")
        return path
    if problem == "empty class":
        path = os.path.join(folder, "train", "dog")
        os.makedirs(path)
        return path
    if problem == "class only in test":
        path = os.path.join(folder, "test", "elk")
        write_image(os.path.join(path, "0.png"), 9, (32, 32))
        return path
    if problem == "mixed channels":
        path = os.path.join(folder, "test", "cow", "gray.png")
        write_image(path, 9, (32, 32), channels=1)
        return path
    if problem == "mixed sizes":
        return "--image_size=HEIGHT,WIDTH"
    if problem == "no train folder":
        os.rename(os.path.join(folder, "train"), os.path.join(folder, "training"))
        return "has no train/ folder"
    raise ValueError(problem)


@pytest.mark.parametrize("problem", ["unreadable image", "empty class", "class only in test", "mixed channels",
                                     "mixed sizes", "no train folder"])
def test_a_broken_folder_is_one_line_naming_the_file(tmp_path, problem):
    folder = write_folder(tmp_path / "images")
    named = break_folder(folder, problem)
    config = folder_config(folder, tmp_path / "tfds", image_size=() if problem == "mixed sizes" else (32, 32))
    with pytest.raises(image_folder.FolderError) as error:
        datasets.prepare(config.data.source, str(tmp_path / "tfds"))
    message = str(error.value)
    assert named in message and "\n" not in message
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))  # nothing prepared


def test_image_size_belongs_to_folders(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="--image_size applies to --dataset=folder:PATH"):
        config_lib.make(dataset="cifar10", image_size=(32, 32))
    with pytest.raises(config_lib.ConfigError, match="needs the folder's path"):
        config_lib.make(dataset="folder:")


def folder_command(*flags):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "mtard_tf.main", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_every_stage_runs_on_a_folder_and_the_export_answers_with_its_class_names(tmp_path, strategies):
    from test_pipeline import TINY
    folder = write_folder(tmp_path / "images", per_split=(("train", 12), ("test", 3)))
    tiny = {**TINY, "dataset": f"folder:{folder}"}
    config = config_lib.make(data_dir=str(tmp_path / "tfds"), image_size=(32, 32), model_dir=str(tmp_path / "run"),
                             attacks=("clean", "fgsm"), num_eval_examples=None, eval_batch_size=4,
                             export_dir=str(tmp_path / "saved_models"), model_name="folder", **tiny)
    datasets.prepare(config.data.source, config.data.data_dir)
    summary = stages.run_all(config, strategies[1])  # trains both teachers, distils, evaluates, exports

    report = summary["reports"]["student"]
    assert report["num_examples"] == 9 and report["attacks"]["clean"]["num_examples"] == 9  # every test image
    assert report["per_class"]["class_names"] == list(CLASSES) and report["per_class"]["num_examples"] == [3, 3, 3]
    served = tf.saved_model.load(summary["export"]).signatures["serving_default"]
    names = served(images=tf.zeros([2, 32, 32, 3]))["class_name"].numpy()
    assert {name.decode() for name in names} <= set(CLASSES)
    with open(os.path.join(config.runtime.model_dir, "export.json")) as f:
        assert json.load(f)["path"] == summary["export"]

    # The command on the prepared folder: evaluation counts every test image, named by class in report.md.
    result = folder_command("--mode=evaluate", f"--dataset=folder:{folder}", "--image_size=32,32",
                            f"--data_dir={tmp_path / 'tfds'}", f"--model={tmp_path / 'run' / 'student.keras'}",
                            f"--model_dir={tmp_path / 'cli'}", "--attacks=clean")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "cli" / "eval" / "report.md") as f:
        markdown = f.read()
    assert "9 test images" in markdown and all(f"| {name} | 3 |" in markdown for name in CLASSES)


def test_a_broken_folder_on_the_command_line_is_one_error_line_and_exit_1(tmp_path):
    folder = write_folder(tmp_path / "images")
    named = break_folder(folder, "unreadable image")
    result = folder_command("--mode=train_teacher", f"--dataset=folder:{folder}", "--image_size=32,32",
                            f"--data_dir={tmp_path / 'tfds'}", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and named in lines[-1] and "Traceback" not in result.stderr
