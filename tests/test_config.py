"""The configuration: one definition (dataclasses) from which the flags, presets, recipes and config.json follow."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from mtard_tf import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_flags(argv=()):
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values(["test", *argv])
    return flag_values


def test_flags_default_to_the_dataclass_defaults():
    assert config_lib.from_flags(fresh_flags()) == config_lib.Config()


def test_every_setting_has_one_flag_and_a_help():
    options = config_lib.options()
    names = [option.name for option in options]
    assert len(names) == len(set(names))
    for option in options:
        assert option.metadata["help"], option.name
    assert {option.name for option in options if not option.cli} == {"verbose"}


def test_a_teacher_is_one_type_used_twice_with_prefixed_flags():
    config = config_lib.from_flags(fresh_flags(["--robust_teacher_epochs=7", "--clean_teacher=/x/clean.keras",
                                                "--clean_teacher_milestones=3,5"]))
    assert type(config.clean_teacher) is type(config.robust_teacher) is config_lib.TeacherConfig
    assert config.robust_teacher.epochs == 7 and config.clean_teacher.epochs == 200
    assert config.teacher("clean").file == "/x/clean.keras" and config.teacher("robust").file == ""
    assert config.clean_teacher.milestones == (3, 5)
    assert (config.clean_teacher.method, config.robust_teacher.method) == ("natural", "trades")
    with pytest.raises(ValueError, match="unknown teacher"):
        config.teacher("medium")


def test_replace_sets_nested_values_by_flag_name_and_checks_groups_once():
    config = config_lib.make(epochs=3, attack_steps=2, milestones=[1, 2], temperature_min=20, temperature_max=30,
                             verbose=0)
    assert (config.schedule.epochs, config.attack.steps, config.schedule.milestones) == (3, 2, (1, 2))
    assert (config.balance.temperature_min, config.balance.temperature_max, config.runtime.verbose) == (20, 30, 0)
    with pytest.raises(config_lib.ConfigError, match="--temperature_min must not exceed --temperature_max"):
        config_lib.make(temperature_min=5, temperature_max=2)
    with pytest.raises(config_lib.ConfigError, match="unknown setting --epoch"):
        config_lib.make(epoch=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.schedule.epochs = 4


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "flags", "*.cfg"))))
def test_presets_state_only_what_differs_from_the_defaults(path):
    defaults = {option.name: option.default for option in config_lib.options()}
    restated = [name for name, value in config_lib.read_flagfile(path).items() if value == defaults[name]]
    assert not restated, f"{os.path.basename(path)} restates defaults: {restated}"


def test_read_flagfile_checks_like_the_command_line(tmp_path):
    good = tmp_path / "good.cfg"
    good.write_text("# comment\n\n--epochs=12\n--milestones=5,9\n--jit_compile=false\n")
    assert config_lib.read_flagfile(str(good)) == {"epochs": 12, "milestones": (5, 9), "jit_compile": "false"}
    for text, message in (("--epochs=0\n", "not a positive integer"), ("--epsilon=2\n", "must be in"),
                          ("--no_such=1\n", "Unknown command line flag 'no_such'"),
                          ("epochs 3\n", "expected --name=value lines")):
        bad = tmp_path / "bad.cfg"
        bad.write_text(text)
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.read_flagfile(str(bad))


def test_dry_run_prints_the_resolved_configuration():
    result = subprocess.run([sys.executable, "-m", "mtard_tf.main", "--flagfile=flags/cpu_small.cfg",
                             "--robust_teacher_epochs=2", "--dry_run"], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    preset = config_lib.read_flagfile(os.path.join(ROOT, "flags", "cpu_small.cfg"))
    expected = config_lib.make(**{**preset, "robust_teacher_epochs": 2})
    assert printed == json.loads(expected.to_json())
    assert printed["robust_teacher"]["epochs"] == 2 and printed["student"] == "resnet18:width=8"
    assert "tensorflow" not in result.stderr.lower()  # the configuration is resolved before TensorFlow starts
