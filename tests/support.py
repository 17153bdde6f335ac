"""Test support, loaded as a pytest plugin by conftest.py in every process that runs tests: two logical CPU devices,
offline mock datasets, a small real image dataset, tiny models, float64 references."""

import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# PyTorch's OpenMP threads block instead of spinning (read when torch loads): CI's two cores are shared, and spinning
# threads there make every parallel region wait for a descheduled one (see mtard_tf/tools/benchmark.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mtard_tf.job import startup  # noqa: E402

tf = startup.start_tensorflow()  # TensorFlow's native start-up lines held back, as the commands do

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

# Two logical CPU devices for the multi-replica tests; must happen before TensorFlow initialises its devices.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

MOCK_TRAIN_EXAMPLES = 64
MOCK_TEST_EXAMPLES = 32


def write_mock_metadata(root, name, num_train, num_test):
    """Writes tfds metadata (features, split sizes) so mock_data serves `name` with real split info, offline."""
    builder = tfds.builder(name, data_dir=root)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name="train", shard_lengths=[num_train], num_bytes=0, filename_template=None),
        tfds.core.SplitInfo(name="test", shard_lengths=[num_test], num_bytes=0, filename_template=None)]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


IMAGE_DATASET = "mtard_test_images"  # real tfds files written by prepare_image_dataset
IMAGE_TRAIN_EXAMPLES = 40
IMAGE_TEST_EXAMPLES = 8


class MtardTestImages(tfds.core.GeneratorBasedBuilder):
    """Random 32x32 RGB images with labels of 10 classes. Registered by this definition, as cifar10 is: in the test
    process tfds builds it from this code; a subprocess, which does not import it, reads it from its files alone."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, supervised_keys=("image", "label"),
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(32, 32, 3)),
                                                 "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, IMAGE_TRAIN_EXAMPLES),
                "test": self._generate_examples(1, IMAGE_TEST_EXAMPLES)}

    def _generate_examples(self, seed, count):
        rng = np.random.default_rng(seed)
        for key in range(count):
            yield key, {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "label": int(rng.integers(10))}


def prepare_image_dataset(root, file_format=None):
    """Prepares IMAGE_DATASET in data_dir `root` with tensorflow-datasets' own writer (3 shards per split, in tfds'
    default format unless `file_format` says otherwise), offline; returns `root` as a string."""
    builder = MtardTestImages(data_dir=str(root), **({"file_format": file_format} if file_format else {}))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
    return str(root)


@pytest.fixture(scope="session")
def strategies():
    """One MirroredStrategy per device set for the whole session: {1: one CPU replica, 2: two CPU replicas}.

    Strategies are shared because a new MirroredStrategy over the same devices can reuse collective instance
    keys of an earlier one in the same process, which TensorFlow reports as a collective shape mismatch.
    """
    return {1: tf.distribute.MirroredStrategy(["/cpu:0"]), 2: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}


@pytest.fixture(scope="session")
def mock_metadata_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds_metadata"))
    for name in ("cifar10", "cifar100"):
        write_mock_metadata(root, name, MOCK_TRAIN_EXAMPLES, MOCK_TEST_EXAMPLES)
    return root


@pytest.fixture
def mock_cifar(mock_metadata_dir):
    """Offline fake CIFAR-10/100 (random pixels and labels) for anything that calls tfds."""
    with tfds.testing.mock_data(num_examples=MOCK_TRAIN_EXAMPLES, data_dir=mock_metadata_dir):
        yield


def tiny_model(name, num_classes=10, input_shape=(32, 32, 3), width=4, synchronized=False):
    """A few-hundred-parameter conv net with BatchNorm: stands in for students and teachers in tests."""
    inputs = keras.Input(input_shape)
    hidden = keras.layers.Conv2D(width, 3, strides=2, padding="same")(inputs)
    hidden = keras.layers.BatchNormalization(synchronized=synchronized)(hidden)
    hidden = keras.layers.ReLU()(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(hidden), name=name)


def write_teacher_files(directory, num_classes=10, input_shape=(32, 32, 3)):
    """Two tiny random-init .keras teachers (10 classes of 32x32 images unless told) in `directory`: (clean, robust)
    paths."""
    keras.utils.set_random_seed(1)
    paths = []
    for name in ("clean_teacher", "robust_teacher"):
        path = os.path.join(str(directory), f"{name}.keras")
        tiny_model(name, num_classes, input_shape).save(path)
        paths.append(path)
    return tuple(paths)


@pytest.fixture
def teacher_files(tmp_path):
    """Two tiny random-init .keras teachers for 10 classes: (clean, robust) paths."""
    return write_teacher_files(tmp_path)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs mtard_tf.main under tfds.testing.mock_data; argv[1] is the mock metadata directory.
MOCK_MAIN = ("import sys, tensorflow_datasets as tfds\n"
             "from mtard_tf import main\n"
             f"with tfds.testing.mock_data(num_examples={MOCK_TRAIN_EXAMPLES}, data_dir=sys.argv.pop(1)):\n"
             "    main.run()\n")


def main_command(metadata_dir, *flags):
    """The command line that runs `python -m mtard_tf.main *flags` on mock data, and its environment."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    return [sys.executable, "-c", MOCK_MAIN, metadata_dir, *flags], env


def run_main(metadata_dir, *flags):
    """Runs the CLI as users run it, in a subprocess, on offline mock data."""
    command, env = main_command(metadata_dir, *flags)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def final_state(model_dir):
    """The trainer state recorded in <model_dir>/student.json and the weights of <model_dir>/student.keras."""
    with open(os.path.join(model_dir, "student.json")) as f:
        state = json.load(f)["state"]
    weights = keras.models.load_model(os.path.join(model_dir, "student.keras")).get_weights()
    return state, weights


# --- float64 NumPy references of the log-softmax and of nn.KLDivLoss(reduction='none') ---------------------------


def log_softmax(z):
    z = np.asarray(z, np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(z):
    return np.exp(log_softmax(z))


def kl_div_elements(log_q, p):
    """nn.KLDivLoss(reduction='none')(log_q, p): p (log p - log_q), 0 where p = 0."""
    return np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - log_q), 0.0)
