"""The train stream read from disk by index (ArrayRecord) is the in-memory stream: the same batches, after a resume,
on each of 2 workers; the choice between the two, and the error without ArrayRecord files.

The data are real tfds files the tests write (support.prepare_image_dataset: tensorflow-datasets' own writer, 3
tfrecord shards per split), then given their ArrayRecord copies by mtard_tf.tools.add_array_record. Every stream is read
to the end of a finite slice, so that no tf.data thread still reads when pytest exits (a process that exits with live
disk streams is tested in a subprocess).
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tensorflow.python.distribute import input_ops

from support import IMAGE_DATASET as NAME, IMAGE_TEST_EXAMPLES as NUM_TEST, IMAGE_TRAIN_EXAMPLES as NUM_TRAIN
from support import ROOT, prepare_image_dataset as prepare, write_teacher_files
from mtard_tf.data import datasets

BATCH = 8


@pytest.fixture(scope="module")
def tfrecord_only(tmp_path_factory):
    """A data_dir holding the dataset in tfds' default format alone."""
    return prepare(tmp_path_factory.mktemp("tfrecord_only"))


@pytest.fixture(scope="module")
def both_formats(tmp_path_factory):
    """A data_dir holding the dataset's tfrecord files and their ArrayRecord copies."""
    root = prepare(tmp_path_factory.mktemp("both_formats"))
    assert datasets.add_array_record(NAME, root) == NUM_TRAIN + NUM_TEST
    assert datasets.add_array_record(NAME, root) == 0  # a second call finds them
    return root


def take(dataset, count):
    """The first `count` elements of `dataset` as numpy, the slice read to its end."""
    return list(dataset.take(count).as_numpy_iterator())


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (images, labels), (other_images, other_labels) in zip(first, second):
        np.testing.assert_array_equal(images, other_images)
        np.testing.assert_array_equal(labels, other_labels)


@pytest.mark.parametrize("holdout", [0, 8])
def test_disk_stream_is_the_memory_stream_and_resumes_the_same(both_formats, holdout):
    def stream(source, start_step=0):
        return datasets.train_dataset(NAME, both_formats, BATCH, seed=3, start_step=start_step, holdout=holdout,
                                      source=source)

    count = 12  # 96 positions: 2.4 epochs of the 40 examples, 3 of the 32 kept: three permutations
    memory = take(stream("memory"), count)
    assert_same_batches(take(stream("disk"), count), memory)
    assert_same_batches(take(stream("disk", start_step=7), count - 7), memory[7:])
    assert len({labels.tobytes() for _, labels in memory}) > 1
    other_seed = take(datasets.train_dataset(NAME, both_formats, BATCH, seed=4, holdout=holdout, source="disk"), 1)
    assert not np.array_equal(other_seed[0][0], memory[0][0])


def worker_stream(dataset, worker, workers=2):
    """What worker `worker` of `workers` (one replica each) reads of `dataset` under MultiWorkerMirroredStrategy:
    tf.distribute's input_lib splits each global batch into the replicas' parts, then auto-shards (DATA policy)."""
    return input_ops.auto_shard_dataset(dataset.rebatch(BATCH // workers), workers, worker, workers)


def test_two_workers_read_their_halves_of_the_same_global_batches(both_formats):
    def stream(source):
        return datasets.train_dataset(NAME, both_formats, BATCH, seed=5, source=source)

    count = 7
    global_batches = take(stream("memory"), count)
    halves = {source: [take(worker_stream(stream(source), worker), count) for worker in (0, 1)]
              for source in ("memory", "disk")}
    assert_same_batches(halves["disk"][0], halves["memory"][0])
    assert_same_batches(halves["disk"][1], halves["memory"][1])
    for k, (images, labels) in enumerate(global_batches):
        np.testing.assert_array_equal(np.concatenate([halves["disk"][w][k][0] for w in (0, 1)]), images)
        np.testing.assert_array_equal(np.concatenate([halves["disk"][w][k][1] for w in (0, 1)]), labels)


def test_holdout_read_from_disk_is_the_in_memory_one(both_formats):
    memory = take(datasets.holdout_dataset(NAME, both_formats, 5, 8), 10)
    disk = take(datasets.holdout_dataset(NAME, both_formats, 5, 8, source="disk"), 10)
    assert [len(labels) for _, labels in disk] == [5, 3]
    assert_same_batches(disk, memory)
    assert_same_batches(take(datasets.holdout_dataset(NAME, both_formats, 5, 8, num_examples=6, source="disk"), 10),
                        take(datasets.holdout_dataset(NAME, both_formats, 5, 8, num_examples=6), 10))


def test_auto_reads_from_disk_above_the_memory_limit(both_formats):
    split_gb = NUM_TRAIN * 32 * 32 * 3 / 1e9
    assert datasets.train_split_bytes(datasets.load_info(NAME, both_formats)) == NUM_TRAIN * 32 * 32 * 3
    assert datasets.train_source(NAME, both_formats, "auto", 4.0) == "memory"
    assert datasets.train_source(NAME, both_formats, "auto", split_gb * 1.01) == "memory"
    assert datasets.train_source(NAME, both_formats, "auto", split_gb / 2) == "disk"
    assert datasets.train_source(NAME, both_formats, "disk", 4.0) == "disk"
    assert datasets.train_source(NAME, both_formats, "memory", 0.0) == "memory"


def test_disk_without_array_record_files_is_one_line_naming_the_command(tfrecord_only):
    command = f"`python -m mtard_tf.tools.add_array_record --dataset={NAME} --data_dir={tfrecord_only}`"
    with pytest.raises(datasets.DataUnavailableError) as forced:
        datasets.train_source(NAME, tfrecord_only, "disk", 4.0)
    with pytest.raises(datasets.DataUnavailableError) as above_limit:
        datasets.train_source(NAME, tfrecord_only, "auto", 1e-6)
    with pytest.raises(datasets.DataUnavailableError) as direct:
        datasets.train_dataset(NAME, tfrecord_only, BATCH, source="disk")
    for error in (forced, above_limit, direct):
        message = str(error.value)
        assert "\n" not in message and "has no ArrayRecord files" in message and message.endswith(command)
    assert "above --in_memory_limit_gb=1e-06 (or force --train_source=memory)" in str(above_limit.value)
    assert datasets.train_source(NAME, tfrecord_only, "memory", 1e-6) == "memory"


def test_array_record_only_dataset_is_one_line_for_what_tf_data_reads(tmp_path):
    prepare(tmp_path, file_format="array_record")
    with pytest.raises(datasets.DataUnavailableError, match="has no tfrecord files, which tf.data reads") as error:
        datasets.eval_dataset(NAME, str(tmp_path), BATCH)
    assert "\n" not in str(error.value)
    assert len(take(datasets.train_dataset(NAME, str(tmp_path), BATCH, source="disk"), 2)) == 2


def test_add_array_record_command_then_a_disk_run(tfrecord_only, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(tfrecord_only, root)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    added = subprocess.run([sys.executable, "-m", "mtard_tf.tools.add_array_record", f"--dataset={NAME}",
                            f"--data_dir={root}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert added.returncode == 0, added.stderr[-3000:]
    assert added.stdout.strip() == (f"dataset '{NAME}': wrote {NUM_TRAIN + NUM_TEST} examples as ArrayRecord beside "
                                    f"its tfrecord files")

    clean, robust = write_teacher_files(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "mtard_tf.main", "--mode=distill", f"--dataset={NAME}", f"--data_dir={root}",
         "--nodownload", "--train_source=auto", "--in_memory_limit_gb=1e-6", "--student=resnet18:width=2,blocks=1",
         "--epochs=1", "--steps_per_epoch=2", f"--batch_size={BATCH}", "--validation_steps=1", "--attack_steps=1",
         "--eval_attack_steps=1", "--select=best_holdout", "--holdout_examples=8", "--select_examples=8",
         f"--clean_teacher={clean}", f"--robust_teacher={robust}", f"--model_dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"train split of '{NAME}': read from disk by index" in run.stdout
    assert "selection: epoch 1" in run.stdout and (tmp_path / "run" / "student.keras").is_file()


EXIT_WITH_LIVE_STREAMS = """
import sys
from tensorflow.python.distribute import input_ops
from mtard_tf.data import datasets
name, root = sys.argv[1:]
streams = [datasets.train_dataset(name, root, 8, seed=seed, source="disk") for seed in range(3)]
streams += [input_ops.auto_shard_dataset(streams[0].rebatch(4), 2, worker, 2) for worker in (0, 1)]
iterators = [iter(stream) for stream in streams]
for _ in range(7):
    for iterator in iterators:
        next(iterator)
print("leaving with", len(iterators), "streams still filling their buffers")
"""


def test_process_ends_normally_while_disk_streams_still_read(both_formats):
    # Without datasets._ReadsAtExit, this process aborted at exit (status 134) in 5 of 6 runs.
    result = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_STREAMS, NAME, both_formats], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "leaving with 5 streams" in result.stdout
