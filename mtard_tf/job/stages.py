"""The whole job (`--mode=all`): teachers, distillation, evaluation, export, each stage resumable.

A stage whose output exists and is valid is skipped, so re-running the same command after an interruption
continues where it stopped; inside a training stage, training resumes from its last step checkpoint.
"""

import hashlib
import json
import os
import time

import tensorflow as tf

from mtard_tf import config as config_lib, files
from mtard_tf.data import datasets
from mtard_tf.evaluation import plot, robustness
from mtard_tf.export import saved_model, tflite
from mtard_tf.job import distribute, runs, wall_time
from mtard_tf.methods import registry
from mtard_tf.methods.b_mtard import BALANCES
from mtard_tf.models import architectures, loading

TEACHER_ATTACKS = ("clean", "pgd_sat")
LATENCY_IMAGES = 200  # test images over which the median latency of a .tflite model is taken


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_file(config, kind):
    """(path of the `kind` teacher, whether it is used as it is): the given file, else
    `<model_dir>/teachers/<kind>.keras`, which is reused when it exists and trained otherwise."""
    given = config.teacher(kind).file
    path = given or runs.teacher_path(config.runtime.model_dir, kind)
    return path, bool(given) or os.path.exists(path)


def student_file(config):
    """(`<model_dir>/student.keras`, whether it exists and is reused rather than trained)."""
    path = os.path.join(config.runtime.model_dir, "student.keras")
    return path, os.path.exists(path)


def teacher_stage(config, kind, strategy):
    """The given teacher file, else `<model_dir>/teachers/<kind>.keras` (trained now unless it exists)."""
    path, reused = teacher_file(config, kind)
    info = datasets.load_info(config.data.source, config.data.data_dir)
    if reused:
        loading.load_teacher(path, info.image_shape, info.num_classes, config.strip_softmax)  # raises with a clear message if invalid
        print(f"{kind} teacher: using {path}")
        return path
    print(f"{kind} teacher: training {path}")
    return runs.train_teacher(config, kind, strategy)[0]


def student_stage(config, strategy):
    """`<model_dir>/student.keras`, trained now with `config.method` unless it exists (checked, then reused); and
    the picture of its balancing dynamics for the two-teacher methods."""
    path, reused = student_file(config)
    if reused:
        info = datasets.load_info(config.data.source, config.data.data_dir)
        loading.load_model(path, info.image_shape, info.num_classes, what="student")
        print(f"student: using {path}")
    else:
        print(f"student: training {path} with {config.method}")
        path = runs.train_student(config, strategy)[0]
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


def summary_path(model_path):
    """Where a trained model's training writes its summary: `student.json` for student.keras."""
    return os.path.splitext(model_path)[0] + ".json"


def model_summary(model_path):
    """The summary written beside a trained model by its training (`summary_path`), or {}."""
    summary = summary_path(model_path)
    if not os.path.exists(summary):
        return {}
    with open(summary) as f:
        return json.load(f)


def model_selection(model_path):
    """The "selection" entry of the summary written beside a trained model (`student.json`), or None."""
    return model_summary(model_path).get("selection")


def evaluate_stage(config, model_path, output_dir, attacks=None, reuse=True):
    """Runs the evaluation suite (`config.eval`) on a .keras model, unless `reuse` and an up-to-date report
    exists."""
    settings = config.eval
    attacks = tuple(attacks or settings.attacks)
    report_path = os.path.join(output_dir, "report.json")
    if reuse and _report_is_current(report_path, model_path, attacks, settings.num_examples):
        print(f"evaluation of {model_path}: using {report_path}")
    else:
        info = datasets.load_info(config.data.source, config.data.data_dir)
        model = architectures.with_dtype_policy(loading.load_model(model_path, info.image_shape, info.num_classes,
                                                                   "model", config.strip_softmax))  # attacks in float32
        dataset = datasets.eval_dataset(config.data.source, config.data.data_dir, settings.batch_size,
                                        settings.num_examples)
        writer = tf.summary.create_file_writer(os.path.join(output_dir, "tensorboard"))
        print(f"evaluation of {model_path}: {', '.join(attacks)}")
        robustness.evaluate(model, dataset, attacks=attacks, epsilon=config.attack.epsilon,
                            num_examples=settings.num_examples, batch_size=settings.batch_size,
                            seed=config.runtime.seed, output_dir=output_dir, summary_writer=writer,
                            progress=bool(config.runtime.verbose), selection=model_selection(model_path),
                            model_file={"path": os.path.abspath(model_path), "sha256": file_sha256(model_path)},
                            class_names=info.class_names)
        writer.close()
    with open(report_path) as f:
        return json.load(f)


def evaluate_tflite_stage(config, tflite_path, output_dir):
    """The robustness of a .tflite model as it ships, beside the float Keras student it was converted from
    (`config.eval.source_model`): robustness.evaluate_deployed on LiteRT's interpreter (tflite.TFLiteModel), with the
    file's size and its latency (batch 1, median over the first LATENCY_IMAGES evaluation images). Returns the report,
    which names the runtime: latency, and in principle results, belong to the runtime that measured them."""
    settings = config.eval
    if not settings.source_model:
        raise config_lib.ConfigError("evaluating a .tflite model needs --source_model=PATH.keras, the float Keras "
                                     "student it was converted from (the transfer attacks are crafted on it)")
    info = datasets.load_info(config.data.source, config.data.data_dir)
    source = architectures.with_dtype_policy(loading.load_model(settings.source_model, info.image_shape,
                                                                info.num_classes, "source model",
                                                                config.strip_softmax))
    deployed = tflite.TFLiteModel(tflite_path)
    if (deployed.image_shape, deployed.num_classes) != (tuple(info.image_shape), info.num_classes):
        raise tflite.TFLiteError(f"{tflite_path} maps images {deployed.image_shape} to {deployed.num_classes} "
                                 f"logits, but the dataset has images {tuple(info.image_shape)} and "
                                 f"{info.num_classes} classes")
    source_sha256 = file_sha256(settings.source_model)
    card = tflite.read_model_card(tflite_path) or {}
    exported_from = card.get("source_model", {}).get("sha256")
    if exported_from not in (None, source_sha256):
        print(f"warning: {tflite_path} was exported from {card['source_model'].get('path')} (sha256 "
              f"{exported_from[:12]}), not from --source_model={settings.source_model}: the float figures are "
              "another model's")
    dataset = datasets.eval_dataset(config.data.source, config.data.data_dir, settings.batch_size,
                                    settings.num_examples)
    latency_images, _ = robustness.take_examples(dataset, min(LATENCY_IMAGES,
                                                              settings.num_examples or LATENCY_IMAGES))
    details = {
        "deployed": {"path": os.path.abspath(tflite_path), "sha256": file_sha256(tflite_path),
                     "bytes": os.path.getsize(tflite_path), "format": "tflite",
                     "quantization": card.get("quantization"), "runtime": tflite.RUNTIME, "threads": tflite.NUM_THREADS,
                     "latency_ms": 1000 * deployed.latency(latency_images), "latency_images": len(latency_images)},
        "source": {"path": os.path.abspath(settings.source_model), "sha256": source_sha256,
                   "matches_model_card": None if exported_from is None else exported_from == source_sha256},
    }
    print(f"evaluation of {tflite_path} beside {settings.source_model}")
    return robustness.evaluate_deployed(deployed, source, dataset, epsilon=config.attack.epsilon,
                                        num_examples=settings.num_examples, batch_size=settings.batch_size,
                                        seed=config.runtime.seed, square_queries=settings.square_queries,
                                        output_dir=output_dir, progress=bool(config.runtime.verbose),
                                        details=details, title=f"Robustness of {os.path.basename(tflite_path)}",
                                        class_names=info.class_names)


def training_recipe(summary, summary_path):
    """How the student was trained, from the configuration its training recorded in `summary` (student.json at
    `summary_path`). A student from before student.json recorded it has no recipe (None): the export command's own
    flags need not be the training's, so they are not offered in its place."""
    recipe = summary.get("config")
    if recipe is None:
        return None
    teacher_kinds = registry.get_method(recipe["method"]).teachers
    return {
        "source": f"{summary_path} (the training run's configuration)",
        "method": recipe["method"], "student": recipe["student"], "dataset": recipe["data"]["dataset"],
        "epsilon": recipe["attack"]["epsilon"], "attack_steps": recipe["attack"]["steps"],
        "epochs": recipe["schedule"]["epochs"], "seed": recipe["runtime"]["seed"],
        "precision": recipe["runtime"]["precision"],
        "teachers": {kind: {key: recipe[f"{kind}_teacher"][key] for key in ("file", "arch", "method", "epochs")}
                     for kind in teacher_kinds},
        "selection": summary.get("selection") or {"mode": recipe["selection"]["select"]},
    }


def evaluation_summary(report_path, model_path, model_sha256):
    """Clean and AutoAttack accuracy (with the 95% CI and N) from the evaluation report of exactly this model file:
    one that records its sha256, or an older report (without it) written after the file; else None."""
    if not os.path.exists(report_path):
        return None
    with open(report_path) as f:
        report = json.load(f)
    evaluated = report.get("model", {}).get("sha256")
    if evaluated is None:  # a report from before reports recorded the model's sha256
        of_this_file = os.path.getmtime(report_path) >= os.path.getmtime(model_path)
    else:
        of_this_file = evaluated == model_sha256
    if not of_this_file:
        return None
    return {"report": os.path.abspath(report_path), "sha256_checked": evaluated is not None,
            "epsilon": report["epsilon"], "num_examples": report["num_examples"],
            "attacks": {name: {key: result.get(key) for key in ("accuracy", "ci95", "num_correct", "num_examples")}
                        for name, result in report["attacks"].items() if name in ("clean", "autoattack")}}


def model_card(student_path, student_sha256, class_names):
    """What an export states about itself (the exporter adds its format, version and interface): the student file
    it was made from (path, sha256), the class names, the training recipe and the evaluation summary of that file
    (from `<student dir>/eval/report.json`; null when there is none of this file)."""
    return {
        "source_model": {"path": os.path.abspath(student_path), "sha256": student_sha256},
        "class_names": list(class_names),
        "training": training_recipe(model_summary(student_path), summary_path(student_path)),
        "evaluation": evaluation_summary(os.path.join(os.path.dirname(student_path), "eval", "report.json"),
                                         student_path, student_sha256),
    }


def export_stage(config, student_path, reuse=True):
    """Exports the student (`config.export`: a TF Serving SavedModel, or a .tflite file), with its model card,
    unless `reuse` and this very student file was exported already in the same format."""
    settings = config.export
    marker = os.path.join(config.runtime.model_dir, "export.json")
    digest = file_sha256(student_path)
    wanted = {"student_sha256": digest, "format": settings.format, "quantize": settings.quantize}
    if reuse and os.path.exists(marker):
        with open(marker) as f:
            previous = json.load(f)
        previous = {"format": "savedmodel", "quantize": "none", **previous}  # markers from before --format
        same = all(previous.get(key) == value for key, value in wanted.items())
        if same and os.path.exists(previous.get("path", "")):
            print(f"export: using {previous['path']}")
            return previous["path"]
    info = datasets.load_info(config.data.source, config.data.data_dir)
    model = architectures.with_dtype_policy(loading.load_model(student_path, info.image_shape, info.num_classes,
                                                               "model", config.strip_softmax), settings.precision)
    card = model_card(student_path, digest, info.class_names)
    if settings.format == "tflite":
        representative = (datasets.first_train_images(config.data.source, config.data.data_dir,
                                                      settings.representative_examples)
                          if settings.quantize == "int8" else None)
        path = tflite.export_tflite(model, settings.export_dir, settings.model_name, settings.quantize,
                                    representative_images=representative, version=settings.version, model_card=card)
    else:
        path = saved_model.export_model(model, settings.export_dir, settings.model_name, list(info.class_names),
                                        version=settings.version, model_card=card)
    files.write_json(marker, {**wanted, "path": path})
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


def plan(config):
    """(stage, what it will do) for each stage of run_all: a file it reuses, or the training's steps; each training
    prints its estimated wall time after its first steps (wall_time.WallTimeEstimate)."""
    info = datasets.load_info(config.data.source, config.data.data_dir)
    steps = runs.steps_per_epoch(config, info)
    stages = []
    for kind in ("clean", "robust"):
        teacher = config.teacher(kind)
        path, reused = teacher_file(config, kind)
        stages.append((f"{kind} teacher", f"use {path}" if reused else
                       f"train {teacher.arch} ({teacher.method}), {teacher.epochs} epochs x {steps} steps"))
    student, reused = student_file(config)
    stages.append(("student", f"use {student}" if reused else
                   f"train {config.student} with {config.method}, {config.schedule.epochs} epochs x {steps} steps"))
    images = f"the first {config.eval.num_examples}" if config.eval.num_examples else f"all {info.num_test}"
    stages.append(("evaluation", f"teachers ({', '.join(TEACHER_ATTACKS)}) and student "
                                 f"({', '.join(config.eval.attacks)}) on {images} {info.test_split} images"))
    stages.append(("export", f"{config.export.format} under {config.export.export_dir}/{config.export.model_name}"))
    return stages


def run_all(config, strategy):
    """Teachers -> student -> evaluation -> export; prints and returns a summary.

    On a multi-worker run every worker trains; the chief alone then evaluates and exports.
    """
    print("\n".join(wall_time.plan_lines(plan(config))), flush=True)
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
              f"{'TFLite' if config.export.format == 'tflite' else 'TF Serving'} export: {export_path}",
              f"TensorBoard:       tensorboard --logdir {config.runtime.model_dir}",
              "wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timed.seconds.items())]
    print("\n".join(lines))
    return {"clean_teacher": clean_path, "robust_teacher": robust_path, "student": student_path,
            "export": export_path, "reports": {name: report for name, (_, report) in reports.items()},
            "seconds": timed.seconds}
