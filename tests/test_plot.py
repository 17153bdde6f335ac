"""mtard_tf.evaluation.plot: per-step scalars read back from TensorBoard logs, the balance picture and its command."""

import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import tensorflow as tf

from mtard_tf.evaluation import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIRST_RUN = range(1, 41)  # steps 1..40, then the run is "resumed" from step 30 and re-logs 31..40
RESUMED_RUN = range(31, 51)


def synthetic_logs(step, resumed):
    """Plausible balancing dynamics at `step`; a resumed run's values differ by +1000 in `loss` to tell them apart."""
    t = step / 50
    logs = {"kl_adv": 2.0 * np.exp(-3 * t) + 0.1, "kl_nat": 1.5 * np.exp(-t) + 0.2,
            "weight_adv": 0.5 - 0.2 * t, "weight_nat": 0.5 + 0.2 * t,
            "temperature_adv": 1.0 + 0.02 * min(step, 35), "temperature_nat": 1.0,
            "entropy_adv": -0.02 - 0.1 * t, "entropy_nat": -0.12 + 0.02 * t, "learning_rate": 0.1}
    logs["loss"] = logs["weight_adv"] * logs["kl_adv"] + logs["weight_nat"] * logs["kl_nat"] + 1000 * resumed
    return logs


# What Distiller.train_step logs every step (tests/test_distiller.py checks the distiller logs exactly these).
STEP_TAGS = ("loss", "kl_adv", "kl_nat", "weight_adv", "weight_nat", "temperature_adv", "temperature_nat",
             "entropy_adv", "entropy_nat", "learning_rate")


def write_run(log_dir, steps, resumed, tags=STEP_TAGS):
    """Writes per-step scalars as mtard_tf.job.summaries.ScalarSummaries does (tf.summary.scalar, tensor summaries)."""
    writer = tf.summary.create_file_writer(log_dir)
    for step in steps:
        logs = synthetic_logs(step, resumed)
        with writer.as_default(step=step):
            for tag in tags:
                tf.summary.scalar(tag, logs[tag])
    writer.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("b_mtard_run"))
    log_dir = os.path.join(model_dir, "tensorboard")
    write_run(log_dir, FIRST_RUN, resumed=False)
    write_run(log_dir, RESUMED_RUN, resumed=True)
    assert len(tf.io.gfile.listdir(log_dir)) == 2  # two event files, as a resumed run leaves
    return model_dir


def test_read_step_scalars_keeps_the_last_value_of_a_relogged_step(run_dir):
    scalars = plot.read_step_scalars(os.path.join(run_dir, "tensorboard"))
    assert set(scalars) == set(STEP_TAGS)
    for tag, (steps, values) in scalars.items():
        np.testing.assert_array_equal(steps, np.arange(1, 51))
        assert np.all(np.diff(steps) > 0) and len(values) == len(steps)
    steps, loss = scalars["loss"]
    for step, value in zip(steps, loss):
        resumed = step in RESUMED_RUN
        assert value == pytest.approx(synthetic_logs(step, resumed)["loss"], rel=1e-6), step
    assert scalars["temperature_adv"][1][-1] == pytest.approx(1.7, rel=1e-6)


def test_read_step_scalars_of_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plot.read_step_scalars(str(tmp_path / "nowhere"))


def test_plot_balance_writes_a_readable_png(run_dir):
    path = plot.plot_balance(run_dir)
    assert path == os.path.join(run_dir, "balance.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) < 200_000
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 300 and width > 300
    assert not [name for name in os.listdir(run_dir) if name.startswith(".partial")]


def test_plot_balance_to_another_path(run_dir, tmp_path):
    output = str(tmp_path / "picture.png")
    assert plot.plot_balance(run_dir, output) == output
    with open(output, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def test_a_run_without_balancing_tags_is_a_clear_error(tmp_path):
    model_dir = str(tmp_path / "sat")
    write_run(os.path.join(model_dir, "tensorboard"), range(1, 6), resumed=False, tags=("loss", "learning_rate"))
    with pytest.raises(ValueError, match="none of the balancing tags") as error:
        plot.plot_balance(model_dir)
    for tag in plot.BALANCE_TAGS:
        assert tag in str(error.value)
    assert model_dir in str(error.value)
    assert not os.path.exists(os.path.join(model_dir, "balance.png"))


def test_a_missing_log_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tensorboard"):
        plot.plot_balance(str(tmp_path))


def run_command(*flags):
    return subprocess.run([sys.executable, "-m", "mtard_tf.evaluation.plot", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_command(run_dir, tmp_path):
    output = os.path.join(run_dir, "balance.png")
    if os.path.exists(output):
        os.remove(output)
    result = run_command(f"--model_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == output
    with open(output, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE

    missing = str(tmp_path / "no_such_run")
    result = run_command(f"--model_dir={missing}", f"--output={tmp_path / 'unused.png'}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and missing in lines[0], result.stderr
