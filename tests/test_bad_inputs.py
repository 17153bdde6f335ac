"""Bad input is one `error:` line naming the problem and exit status 1, with no traceback, and the run's directories
keep what they held: flags (also in a flagfile), files of the wrong kind, image counts beyond a split."""

import os
import subprocess
import sys

import pytest

from support import ROOT, main_command, tiny_model, write_teacher_files

PREVIOUS_CONFIG = '{"previous": "run"}\n'


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files the bad commands name: good teachers, a 1-channel teacher, a misspelled flagfile, a plain file, a
    SavedModel cut short, a .tflite that is text, an export directory whose version 1 exists."""
    root = tmp_path_factory.mktemp("bad_inputs")
    clean, robust = write_teacher_files(root)
    gray = str(root / "gray.keras")
    tiny_model("gray", input_shape=(32, 32, 1)).save(gray)
    (root / "typo.cfg").write_text("--epochs=1\n--epocs=3\n")
    (root / "a_file").write_text("")
    saved_model = root / "saved_model" / "1"
    saved_model.mkdir(parents=True)
    (saved_model / "saved_model.pb").write_bytes(b"\x08\x01 cut short")
    (root / "fake.tflite").write_text("not a flatbuffer")
    (root / "exports" / "mtard_student" / "1").mkdir(parents=True)
    return {"root": str(root), "clean": clean, "robust": robust, "gray": gray}


def cases(paths):
    """(flags, the message the error line holds, whether the command refuses before its run starts, when it has
    not yet written <model_dir>/config.json) for mtard_tf.main; `paths` are the fixture's files."""
    root, clean, robust = paths["root"], paths["clean"], paths["robust"]
    teachers = [f"--clean_teacher={clean}", f"--robust_teacher={robust}"]
    distill = ["--mode=distill", *teachers, "--epochs=1", "--steps_per_epoch=1", "--batch_size=8"]
    return {
        "misspelled flag in a flagfile": ([f"--flagfile={root}/typo.cfg"], "Unknown command line flag 'epocs'", True),
        "missing flagfile": ([f"--flagfile={root}/missing.cfg"], "Unable to open flagfile", True),
        "positional argument": (["--mode=distill", "student.keras"], "unexpected arguments: student.keras", True),
        "teacher of another channel count": (
            ["--mode=distill", f"--clean_teacher={paths['gray']}", f"--robust_teacher={robust}"],
            "expects input images of shape (32, 32, 1), but the dataset's images are (32, 32, 3)", False),
        "export_dir is a file": (["--mode=export", f"--model={clean}", f"--export_dir={root}/a_file"],
                                 f"under --export_dir={root}/a_file: Not a directory", False),
        "existing --model_version": (
            ["--mode=export", f"--model={clean}", f"--export_dir={root}/exports", "--model_version=1"],
            "version 1 of model 'mtard_student' already exists", False),
        "SavedModel given to evaluation": (["--mode=evaluate", f"--model={root}/saved_model/1"],
                                           "is a directory (a SavedModel?), not a .keras file", False),
        "file that is not TFLite": (["--mode=evaluate", f"--model={root}/fake.tflite", f"--source_model={clean}"],
                                    f"{root}/fake.tflite is not a TFLite model", False),
        "--select_examples beyond the test split": (
            [*distill, "--select=best_test", "--select_examples=33"],
            "--select_examples=33 asks for more images than the test split of 'cifar10' holds (32)", True),
        "--num_eval_examples beyond the test split": (
            ["--mode=evaluate", f"--model={clean}", "--num_eval_examples=40"],
            "--num_eval_examples=40 asks for more images than the test split of 'cifar10' holds (32)", True),
        "--holdout_examples as large as the train split": (
            [*distill, "--select=best_holdout", "--holdout_examples=64"],
            "--holdout_examples=64 asks for more images than the train split of 'cifar10' less one image to "
            "train on holds (63)", True),
        "--select_examples beyond the holdout": (
            [*distill, "--select=best_holdout", "--holdout_examples=8", "--select_examples=9"],
            "--select_examples=9 asks for more images than the holdout holds (8)", True),
    }


CASE_NAMES = list(cases({"root": "", "clean": "", "robust": "", "gray": ""}))


def assert_one_error_line(result, message):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "FATAL" not in result.stderr


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line_and_leaves_the_run_as_it_was(mock_metadata_dir, inputs, tmp_path, case):
    flags, message, refused_before_start = cases(inputs)[case]
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(PREVIOUS_CONFIG)
    exports = sorted(os.listdir(os.path.join(inputs["root"], "exports", "mtard_student")))
    command, env = main_command(mock_metadata_dir, *flags, f"--model_dir={model_dir}")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert_one_error_line(result, message)
    assert os.listdir(model_dir) == ["config.json"]
    if refused_before_start:
        assert (model_dir / "config.json").read_text() == PREVIOUS_CONFIG
    assert sorted(os.listdir(os.path.join(inputs["root"], "exports", "mtard_student"))) == exports


def test_model_dir_that_is_a_file_is_one_line(mock_metadata_dir, inputs):
    command, env = main_command(mock_metadata_dir, "--mode=distill", f"--clean_teacher={inputs['clean']}",
                                f"--robust_teacher={inputs['robust']}", f"--model_dir={inputs['root']}/a_file")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert_one_error_line(result, f"--model_dir={inputs['root']}/a_file is a file, not a directory")
    assert os.path.getsize(os.path.join(inputs["root"], "a_file")) == 0


@pytest.mark.parametrize("flags,message", [
    (["--seeds=0,x"], "--seeds must be distinct non-negative integers"),
    (["--methods=b_mtard,b_mtard"], "--methods must be distinct names"),
    (["--recipe=paper"], "value should be one of <equal|reference>"),
])
def test_bad_reproduce_flags_are_one_line(tmp_path, flags, message):
    result = subprocess.run([sys.executable, "-m", "mtard_tf.reproduce", *flags, f"--model_dir={tmp_path}/run"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert_one_error_line(result, message)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("module", ["mtard_tf.main", "mtard_tf.reproduce", "mtard_tf.tools.benchmark",
                                    "mtard_tf.tools.add_array_record", "mtard_tf.evaluation.plot",
                                    "mtard_tf.pytorch.importer", "mtard_tf.tools.factor_tables"])
def test_every_command_refuses_a_misspelled_flag_in_one_line(module):
    result = subprocess.run([sys.executable, "-m", module, "--no_such_flag=1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert_one_error_line(result, "Unknown command line flag 'no_such_flag'")
