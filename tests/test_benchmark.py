"""Smoke tests of the throughput benchmark (no timing assertion): it runs and prints complete JSON records."""

import json
import os
import subprocess
import sys

import pytest

from support import IMAGE_DATASET, prepare_image_dataset
from mtard_tf.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--student=resnet18:width=2", "--clean_teacher_arch=resnet56:depth=8,width=2",
        "--robust_teacher_arch=wrn34_10:depth=10,widen=1", "--batch_size=4", "--steps=1", "--warmup=1",
        "--attack_steps=1", "--jit_compile=false", "--matmul_size=64"]


def _run(*flags, pythonpath=ROOT):
    return subprocess.run([sys.executable, "-m", "mtard_tf.tools.benchmark", *flags], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=pythonpath), capture_output=True, text=True, timeout=600)


def _records(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_benchmark_prints_one_record_per_configuration_and_input_pipeline(tmp_path):
    data_dir = prepare_image_dataset(tmp_path)
    datasets.add_array_record(IMAGE_DATASET, data_dir)
    all_records = _records(_run(
        "--student=resnet18:width=2,blocks=1", "--clean_teacher_arch=resnet56:depth=8,width=4",
        "--robust_teacher_arch=wrn34_10:depth=10,widen=1", "--batch_size=4", "--steps=1", "--attack_steps=2",
        "--matmul_size=128", "--jit_compile=false,true", "--pipeline_batches=3", "--pipeline_sources=memory,disk",
        f"--dataset={IMAGE_DATASET}", f"--data_dir={data_dir}"))
    records = [record for record in all_records if "config" in record]
    pipelines = [record for record in all_records if "input_pipeline_images_per_s" in record]
    assert len(records) + len(pipelines) == len(all_records)
    assert [record["config"]["jit_compile"] for record in records] == [False, True]
    assert [record["train_source"] for record in pipelines] == ["memory", "disk"]
    for record in pipelines:
        assert record["input_pipeline_images_per_s"] > 0 and record["batch_size"] == 4
        assert record["step_images_per_s"] == max(r["images_per_s"] for r in records)
        assert record["pipeline_over_step"] == pytest.approx(
            record["input_pipeline_images_per_s"] / record["step_images_per_s"], abs=0.06)
    for record in records:
        assert record["images_per_s"] > 0 and record["ms_per_step"] > 0
        assert set(record["split_ms"]) == {"attack", "teachers", "student_update"}
        student_flops = record["forward_flops_per_image"]["student"]
        assert student_flops > 0 and record["flops_per_step"] > 4 * (2 * 2 + 6) * student_flops
        # The fraction compares two timings of a loaded machine (no bound on it here: figures belong in benchmark
        # runs); it must be the ratio of the two rates the record reports.
        assert record["matmul_fraction"] == pytest.approx(
            record["achieved_flops_per_s"] / record["matmul_flops_per_s"], abs=1e-4)
        assert record["matmul_fraction"] > 0
        # float32: a gradient almost everywhere (a few exact zeros behind the dead ReLUs of a width-2 network).
        assert 0 <= record["attack_zero_gradient_fraction"] < 0.1
        assert record["matmul_dtype"] == "float32"
        assert record["matmul_flops_per_s"] == record["matmul_flops_per_s_float32"]
        assert record["peak_rss_mb"] > 0
        assert "torch_images_per_s" not in record


def test_bfloat16_run_against_the_bfloat16_matmul_rate_with_the_pytorch_side_by_side():
    pytest.importorskip("torch")
    [record] = _records(_run(*TINY, "--precision=mixed_bfloat16", "--compare_torch"))  # one run checks both
    assert record["matmul_dtype"] == "bfloat16"
    assert record["matmul_flops_per_s"] > 0 and record["matmul_flops_per_s_float32"] > 0
    assert record["matmul_fraction"] == pytest.approx(
        record["achieved_flops_per_s"] / record["matmul_flops_per_s"], abs=1e-4)
    tf_rate, torch_rate = record["images_per_s"], record["torch_images_per_s"]
    assert torch_rate > 0 and record["torch_ms_per_step"] > 0
    # Both rates are rounded to 0.01 images/s and the speedup to 0.001: equal up to that rounding.
    rounding = 0.0005 + tf_rate / torch_rate * (0.005 / tf_rate + 0.005 / torch_rate)
    assert record["speedup_vs_torch"] == pytest.approx(tf_rate / torch_rate, abs=rounding)
    assert record["config"]["torch_threads"] >= 1


def test_compare_torch_without_torch_is_one_error_line(tmp_path):
    fake_torch = tmp_path / "torch"
    fake_torch.mkdir()
    (fake_torch / "__init__.py").write_text('raise ImportError("No module named \'torch\'")\n')
    result = _run(*TINY, "--compare_torch", pythonpath=os.pathsep.join((str(tmp_path), ROOT)))
    assert result.returncode == 1
    assert not result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--compare_torch needs torch" in errors[0], result.stderr[-2000:]


def test_precisions_side_by_side_each_with_a_profile(tmp_path):
    records = _records(_run(*TINY, "--precision=float32,mixed_bfloat16,float32", f"--profile_dir={tmp_path}"))
    # A repeated precision is measured once.
    assert [r["config"]["precision"] for r in records] == ["float32", "mixed_bfloat16"]
    for record in records:
        profile = record["profile"]
        assert profile["trace"].startswith(os.path.join(str(tmp_path), "")) and os.path.isfile(profile["trace"])
        assert os.path.basename(os.path.dirname(os.path.dirname(profile["trace"]))) == "profile"
        assert min(profile["op_ms_by_part"][part] for part in ("attack", "teachers", "student_update")) > 0
        assert profile["top_op_types_ms"]


def test_two_replicas_measure_the_step_and_skip_xla():
    records = _records(_run(*TINY, "--cpu_replicas=2", "--jit_compile=false,true"))
    assert records[0]["config"]["replicas"] == 2 and records[0]["images_per_s"] > 0
    assert records[1] == {"config": {"jit_compile": True, "replicas": 2},
                          "skipped": "XLA does not work under MirroredStrategy with several replicas"}


@pytest.mark.parametrize("flags,message", [
    (["--precision=float64"], "--precision=float64: expected a list of auto, float32, mixed_float16, mixed_bfloat16"),
    (["--precision=float32,bf16"], "--precision=float32,bf16: expected a list of auto, float32"),
])
def test_bad_precisions_are_one_error_line(flags, message):
    result = _run(*TINY, *flags)
    assert result.returncode == 1 and not result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
