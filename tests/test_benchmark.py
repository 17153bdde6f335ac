"""Smoke test of the throughput benchmark (no timing assertion): it runs and prints complete JSON records."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_prints_one_record_per_configuration():
    command = [sys.executable, "-m", "mtard_tf.benchmark", "--student=resnet18:width=2,blocks=1",
               "--clean_teacher_arch=resnet56:depth=8,width=4", "--robust_teacher_arch=wrn34_10:depth=10,widen=1",
               "--batch_size=4", "--steps=1", "--attack_steps=2", "--matmul_size=128", "--jit_compile=false,true"]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [record["config"]["jit_compile"] for record in records] == [False, True]
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
