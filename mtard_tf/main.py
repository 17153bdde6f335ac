"""Command line of mtard_tf, `python -m mtard_tf.main --mode=...`, whose flags are read in main() and nowhere else."""

import os

from absl import flags

from mtard_tf import config
from mtard_tf.job import startup

FLAGS = flags.FLAGS

MODES = ("all", "distill", "train_teacher", "evaluate", "export")


def define_flags(flag_values=FLAGS):
    """Every configuration flag (config.define_flags) and the command's own (called by run())."""
    config.define_flags(flag_values)
    if "mode" in flag_values:
        return
    flags.DEFINE_enum("mode", "all", MODES, "all: teachers (trained unless given or present), the student, "
                      "evaluation, export, each skipped when its output exists; or one of those stages alone.",
                      flag_values=flag_values)
    flags.DEFINE_enum("teacher", "clean", ["clean", "robust"], "Which teacher --mode=train_teacher trains.",
                      flag_values=flag_values)
    flags.DEFINE_string("model", None, "The .keras model that --mode=evaluate / --mode=export works on; "
                        "--mode=evaluate also takes a .tflite export (with --source_model: transfer attacks from the "
                        "float student, Square directly against the TFLite interpreter; report in "
                        "<model_dir>/eval/tflite/<model name>-<version>/).", flag_values=flag_values)
    flags.DEFINE_boolean("dry_run", False, "Print the run's resolved configuration (as <model_dir>/config.json "
                         "would hold it) and exit.", flag_values=flag_values)


def run_mode(mode, run_config, teacher=None, model=None):
    """One stage of the job, or all of them (stages.run_all)."""
    from mtard_tf.job import distribute, runs, stages
    model_dir = run_config.runtime.model_dir
    if mode in ("evaluate", "export") and not model:
        raise config.ConfigError(f"--mode={mode} needs --model=PATH.keras")
    if mode == "all":
        stages.run_all(run_config, distribute.announce(distribute.make_strategy(run_config.runtime.strategy)))
    elif mode == "distill":
        strategy = distribute.announce(distribute.make_strategy(run_config.runtime.strategy))
        path, _ = runs.train_student(run_config, strategy)
        print(f"student ({run_config.method}) saved to {path}")
        if distribute.is_chief(strategy):
            stages.balance_picture(run_config)
    elif mode == "train_teacher":
        strategy = distribute.announce(distribute.make_strategy(run_config.runtime.strategy))
        path, _ = runs.train_teacher(run_config, teacher, strategy)
        print(f"{teacher} teacher saved to {path}")
    elif mode == "evaluate" and model.endswith(".tflite"):
        model_name, version = os.path.basename(os.path.dirname(os.path.abspath(model))), os.path.basename(model)
        output_dir = os.path.join(model_dir, "eval", "tflite", f"{model_name}-{os.path.splitext(version)[0]}")
        stages.evaluate_tflite_stage(run_config, model, output_dir)
        print(f"report: {os.path.join(output_dir, 'report.md')}")
    elif mode == "evaluate":
        output_dir = os.path.join(model_dir, "eval")
        stages.evaluate_stage(run_config, model, output_dir, reuse=False)
        print(f"report: {os.path.join(output_dir, 'report.md')}")
    elif mode == "export":
        stages.export_stage(run_config, model, reuse=False)


def main(argv):
    del argv  # startup.parse_flags refuses positional arguments
    mode, teacher, model = FLAGS.mode, FLAGS.teacher, FLAGS.model
    return startup.run_command(lambda: config.from_flags(FLAGS),
                               lambda run_config: run_mode(mode, run_config, teacher, model),
                               verbose=FLAGS["verbosity"].present, dry_run=FLAGS.dry_run,
                               trains=mode not in ("evaluate", "export"))


def run():
    define_flags()
    startup.run_app(main)


if __name__ == "__main__":
    run()
