"""Model selection (--select): the reference's evaluation schedule, the held-out split, and the saved students."""

import json
import os

import keras
import numpy as np
import pytest

from support import MOCK_TRAIN_EXAMPLES, run_main
from mtard_tf.data import datasets
from mtard_tf.evaluation import robustness
from mtard_tf.job import runs

DISTILL = ["--mode=distill", "--dataset=cifar10", "--student=resnet18:width=2,blocks=1", "--epochs=3",
           "--milestones=2", "--steps_per_epoch=2", "--batch_size=8", "--validation_steps=1", "--attack_steps=1",
           "--eval_attack_steps=1", "--select_every_before=1", "--select_examples=16"]


def test_select_epochs_follow_the_reference_schedule():
    # MTARD-extension resnet18_mtard_cifar10.py: epoch 1, every 20th before 215, every epoch from 215 on.
    expected = (1, *range(20, 215, 20), *range(215, 301))
    assert runs.select_epochs(300, (215, 260, 285), 20) == expected
    assert runs.select_epochs(5, (4,), 20) == (1, 4, 5)
    assert runs.select_epochs(7, (), 3) == (1, 3, 6, 7)


def test_held_out_examples_never_reach_the_training_stream(mock_cifar):
    holdout = 16
    images, _ = datasets._train_arrays("cifar10", None)  # pylint: disable=protected-access
    held = {bytes(image) for image in np.asarray(images[-holdout:])}
    kept = {bytes(image) for image in np.asarray(images[:-holdout])}
    stream = iter(datasets.train_dataset("cifar10", None, 8, seed=3, augment=False, holdout=holdout))
    seen = set()
    for _ in range(2 * (MOCK_TRAIN_EXAMPLES - holdout) // 8):  # two epochs of the kept examples
        batch, _ = next(stream)
        seen |= {bytes(np.round(image * 255).astype(np.uint8)) for image in batch.numpy()}
    assert seen == kept and not seen & held
    holdout_images = np.concatenate([x.numpy() for x, _ in datasets.holdout_dataset("cifar10", None, 5, holdout)])
    assert {bytes(np.round(image * 255).astype(np.uint8)) for image in holdout_images} == held


@pytest.mark.parametrize("mode,split", [("best_test", "test"), ("best_holdout", "train[-16:] (held out)")])
def test_selected_and_last_students_are_saved_with_the_record(mock_metadata_dir, mock_cifar, teacher_files, tmp_path,
                                                              mode, split):
    model_dir = tmp_path / "run"
    result = run_main(mock_metadata_dir, *DISTILL, f"--select={mode}", "--holdout_examples=16",
                      f"--clean_teacher={teacher_files[0]}", f"--robust_teacher={teacher_files[1]}",
                      f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model_dir / "student.keras").is_file() and (model_dir / "student_last.keras").is_file()
    summary = json.loads((model_dir / "student.json").read_text())
    selection, history = summary["selection"], summary["selection_history"]
    assert selection["mode"] == mode and selection["split"] == split
    assert selection["metric_name"] == "(clean + PGD-TRADES-20) / 2" and selection["num_examples"] == 16
    assert sorted(history, key=int) == ["1", "2", "3"]
    metrics = [history[str(epoch)]["metric"] for epoch in (1, 2, 3)]
    assert selection["epoch"] == 1 + int(np.argmax(metrics))  # the first of equals, as the reference's strict >
    assert selection["metric"] == max(metrics)
    assert summary["last"]["path"].endswith("student_last.keras")

    # student.keras is the selected epoch's model: evaluated again the same way, it gives the recorded figure.
    if mode == "best_test":
        dataset = datasets.eval_dataset("cifar10", None, 250, 16)
    else:
        dataset = datasets.holdout_dataset("cifar10", None, 250, 16, 16)
    report = robustness.evaluate(keras.models.load_model(model_dir / "student.keras"), dataset,
                                 attacks=("clean", "pgd_trades"), num_examples=16, seed=0,
                                 output_dir=str(tmp_path / "again"), progress=False)
    assert report["attacks"]["pgd_trades"]["w_robust"] == pytest.approx(selection["metric"])
    assert os.path.isfile(model_dir / "selection" / f"epoch-{selection['epoch']}" / "report.json")


def test_last_mode_records_the_last_epoch(mock_metadata_dir, teacher_files, tmp_path):
    model_dir = tmp_path / "run"
    result = run_main(mock_metadata_dir, *DISTILL, "--epochs=1", f"--clean_teacher={teacher_files[0]}",
                      f"--robust_teacher={teacher_files[1]}", f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((model_dir / "student.json").read_text())["selection"] == {"mode": "last", "epoch": 1}
    assert not (model_dir / "student_last.keras").exists()
