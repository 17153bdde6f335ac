"""The whole job (`--mode=all`): teachers, distillation, evaluation, export, each stage resumable.

A stage whose output exists and is valid is skipped, so re-running the same command after an interruption
continues where it stopped; inside a training stage, training resumes from its last step checkpoint.
"""

import hashlib
import json
import os
import time

import tensorflow as tf

from mtard_tf import config as config_lib, data, distribute, evaluation, export, files, models, plot, teachers, training
from mtard_tf.distiller import BALANCES

TEACHER_ATTACKS = ("clean", "pgd_sat")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_stage(config, kind, strategy):
    """The given teacher file, else `<model_dir>/teachers/<kind>.keras` (trained now unless it exists)."""
    given = config.teacher(kind).file
    path = given or training.teacher_path(config.runtime.model_dir, kind)
    info = data.load_info(config.data.dataset, config.data.data_dir)
    if given or os.path.exists(path):
        teachers.load_teacher(path, info.image_shape, info.num_classes)  # raises with a clear message if invalid
        print(f"{kind} teacher: using {path}")
        return path
    print(f"{kind} teacher: training {path}")
    return training.train_teacher(config, kind, strategy)[0]


def student_stage(config, strategy):
    """`<model_dir>/student.keras`, trained now with `config.method` unless it exists (checked, then reused); and
    the picture of its balancing dynamics for the two-teacher methods."""
    path = os.path.join(config.runtime.model_dir, "student.keras")
    if os.path.exists(path):
        info = data.load_info(config.data.dataset, config.data.data_dir)
        teachers.load_model(path, info.image_shape, info.num_classes, what="student")
        print(f"student: using {path}")
    else:
        print(f"student: training {path} with {config.method}")
        path = training.train_student(config, strategy)[0]
    if distribute.is_chief(strategy):
        balance_picture(config)
    return path


def balance_picture(config):
    """`<model_dir>/balance.png` (plot.plot_balance) for B-MTARD and MTARD students, unless it is newer than the
    student; None for methods without balancing state."""
    if config.method not in BALANCES:
        return None
    model_dir = config.runtime.model_dir
    path = os.path.join(model_dir, "balance.png")
    student = os.path.join(model_dir, "student.keras")
    if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(student):
        plot.plot_balance(model_dir, path)
        print(f"balancing dynamics: {path}")
    return path


def _report_is_current(report_path, model_path, attacks, num_examples):
    if not os.path.exists(report_path) or os.path.getmtime(report_path) < os.path.getmtime(model_path):
        return False
    with open(report_path) as f:
        report = json.load(f)
    results = report.get("attacks", {})
    wanted = {name: result for name, result in results.items() if name in attacks}
    return len(wanted) == len(attacks) and all(
        num_examples is None or result.get("num_examples") == num_examples for result in wanted.values())


def model_selection(model_path):
    """The "selection" entry of the summary written beside a trained model (`student.json`), or None."""
    summary = os.path.splitext(model_path)[0] + ".json"
    if not os.path.exists(summary):
        return None
    with open(summary) as f:
        return json.load(f).get("selection")


def evaluate_stage(config, model_path, output_dir, attacks=None, reuse=True):
    """Runs the evaluation suite (`config.eval`) on a .keras model, unless `reuse` and an up-to-date report
    exists."""
    settings = config.eval
    attacks = tuple(attacks or settings.attacks)
    report_path = os.path.join(output_dir, "report.json")
    if reuse and _report_is_current(report_path, model_path, attacks, settings.num_examples):
        print(f"evaluation of {model_path}: using {report_path}")
    else:
        info = data.load_info(config.data.dataset, config.data.data_dir)
        model = models.with_dtype_policy(teachers.load_model(model_path, info.image_shape, info.num_classes,
                                                             what="model"))  # attacks in float32
        dataset = data.eval_dataset(config.data.dataset, config.data.data_dir, settings.batch_size,
                                    settings.num_examples)
        writer = tf.summary.create_file_writer(os.path.join(output_dir, "tensorboard"))
        print(f"evaluation of {model_path}: {', '.join(attacks)}")
        evaluation.evaluate(model, dataset, attacks=attacks, epsilon=config.attack.epsilon,
                            num_examples=settings.num_examples, batch_size=settings.batch_size,
                            seed=config.runtime.seed, output_dir=output_dir, summary_writer=writer,
                            progress=bool(config.runtime.verbose), selection=model_selection(model_path))
        writer.close()
    with open(report_path) as f:
        return json.load(f)


def export_stage(config, student_path, reuse=True):
    """Exports the student for TF Serving (`config.export`), unless `reuse` and this very student file was exported
    already."""
    marker = os.path.join(config.runtime.model_dir, "export.json")
    digest = file_sha256(student_path)
    if reuse and os.path.exists(marker):
        with open(marker) as f:
            previous = json.load(f)
        if previous.get("student_sha256") == digest and os.path.isdir(previous.get("path", "")):
            print(f"export: using {previous['path']}")
            return previous["path"]
    info = data.load_info(config.data.dataset, config.data.data_dir)
    model = models.with_dtype_policy(teachers.load_model(student_path, info.image_shape, info.num_classes,
                                                         what="model"), config.export.precision)
    path = export.export_model(model, config.export.export_dir, config.export.model_name, list(info.class_names),
                               version=config.export.version)
    files.write_json(marker, {"student_sha256": digest, "path": path})
    print(f"export: {path}")
    return path


def _accuracy(report, attack):
    result = report.get("attacks", {}).get(attack)
    return f"{100 * result['accuracy']:6.2f}%" if result else "   n/a "


class StageTimer:
    """Wall time of each stage, for the summary."""

    def __init__(self):
        self.seconds = {}

    def __call__(self, name, function, *args, **kwargs):
        start = time.time()
        result = function(*args, **kwargs)
        self.seconds[name] = time.time() - start
        return result


def run_all(config, strategy):
    """Teachers -> student -> evaluation -> export; prints and returns a summary.

    On a multi-worker run every worker trains; the chief alone then evaluates and exports.
    """
    timed = StageTimer()
    clean_path = timed("clean teacher", teacher_stage, config, "clean", strategy)
    robust_path = timed("robust teacher", teacher_stage, config, "robust", strategy)
    config = config_lib.replace(config, clean_teacher=clean_path, robust_teacher=robust_path)
    student_path = timed("student", student_stage, config, strategy)
    if not distribute.is_chief(strategy):
        print(f"non-chief worker: training done; the chief evaluates and exports {student_path}")
        return {"clean_teacher": clean_path, "robust_teacher": robust_path, "student": student_path,
                "seconds": timed.seconds}
    eval_dir = os.path.join(config.runtime.model_dir, "eval")
    reports = {
        "clean teacher": (clean_path, timed("evaluate clean teacher", evaluate_stage, config, clean_path,
                                            os.path.join(eval_dir, "clean_teacher"), TEACHER_ATTACKS)),
        "robust teacher": (robust_path, timed("evaluate robust teacher", evaluate_stage, config, robust_path,
                                              os.path.join(eval_dir, "robust_teacher"), TEACHER_ATTACKS)),
        "student": (student_path, timed("evaluate student", evaluate_stage, config, student_path, eval_dir)),
    }
    export_path = timed("export", export_stage, config, student_path)

    num_examples = reports["student"][1]["attacks"]["clean"]["num_examples"]
    lines = [f"== mtard_tf: done. Accuracy on the first {num_examples} {config.data.dataset} test images ==",
             f"{'model':<15} {'clean':>7} {'PGD-20':>7} {'AA':>7}  file"]
    for name, (path, report) in reports.items():
        lines.append(f"{name:<15} {_accuracy(report, 'clean')} {_accuracy(report, 'pgd_sat')} "
                     f"{_accuracy(report, 'autoattack')}  {path}")
    lines += [f"evaluation report: {os.path.join(eval_dir, 'report.md')}",
              f"TF Serving export: {export_path}",
              f"TensorBoard:       tensorboard --logdir {config.runtime.model_dir}",
              "wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timed.seconds.items())]
    print("\n".join(lines))
    return {"clean_teacher": clean_path, "robust_teacher": robust_path, "student": student_path,
            "export": export_path, "reports": {name: report for name, (_, report) in reports.items()},
            "seconds": timed.seconds}
