"""--profile_dir: a TensorFlow profiler trace of one chosen training step, where TensorBoard finds it."""

import os

from mtard_tf import config as config_lib
from mtard_tf.job import profiling, runs


def test_profile_dir_traces_the_chosen_step_of_a_distillation(mock_cifar, teacher_files, tmp_path, strategies):
    profile_dir = str(tmp_path / "profile")
    config = config_lib.make(
        student="resnet18:width=2,blocks=1", clean_teacher=teacher_files[0], robust_teacher=teacher_files[1],
        model_dir=str(tmp_path / "run"), epochs=1, steps_per_epoch=3, batch_size=8, validation_steps=1,
        attack_steps=1, eval_attack_steps=1, jit_compile="false", verbose=0, profile_dir=profile_dir,
        profile_step=2)
    runs.train_student(config, strategies[1])
    logdir = os.path.join(profile_dir, "student")
    [trace] = profiling.trace_files(logdir)  # one step: one start and stop of the profiler
    assert os.path.dirname(os.path.dirname(trace)) == os.path.join(logdir, "plugins", "profile")
    by_part = profiling.op_seconds(trace, profiling.part_of)
    assert {"attack", "teachers", "student_update"} <= set(by_part)
    assert min(by_part[part] for part in profiling.STEP_PARTS) > 0
    assert profiling.op_seconds(trace)  # op types

