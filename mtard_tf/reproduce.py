"""The paper's comparison at any scale: python -m mtard_tf.reproduce --flagfile=flags/cpu_small.cfg [--methods=...].

Trains (or reuses) the two teachers once, then one student per method (SPEC 1.7) with the same architecture,
initialisation, epochs, schedule, seed and data order, evaluates teachers and students with the same attacks
(SPEC 2), and writes into --model_dir:

    comparison.md    the paper's table: Clean, FGSM, PGD-SAT, PGD-TRADES, CW-inf, AutoAttack, W-Robust
    comparison.json  the same numbers (and every attack's W-Robust, file paths, wall times)
    tradeoff.png     clean accuracy against AutoAttack accuracy, one labelled point per model

Layout: `<model_dir>/teachers/{clean,robust}.keras` and `<model_dir>/eval/{clean,robust}_teacher/` (shared with
--mode=all), `<model_dir>/students/<method>/` (student.keras, eval/, tensorboard/, checkpoints/). Every stage whose
output exists and is valid is reused, and an interrupted training resumes from its last checkpoint, so re-running the
command continues where it stopped. Every flag of mtard_tf.main applies (`--method` is replaced by `--methods`).
"""

import dataclasses
import json
import os
import time

from absl import app, flags

from mtard_tf import main as cli  # defines the shared flags

FLAGS = flags.FLAGS

flags.DEFINE_list("methods", list(cli.METHOD_NAMES), "Student methods to train and compare, in table order.")
flags.register_validator("methods", lambda v: bool(v) and set(v) <= set(cli.METHOD_NAMES) and len(set(v)) == len(v),
                         f"--methods must be distinct names from {','.join(cli.METHOD_NAMES)}")

TEACHER_METHODS = {"natural": "Natural", "trades": "TRADES", "pgd_at": "SAT"}
# The attack of the W-Robust column and of the trade-off plot's x axis: the strongest one evaluated.
ROBUST_PREFERENCE = ("autoattack", "cw", "pgd_trades", "pgd_sat", "fgsm")


def _teacher_row(config, kind, path, report):
    given = config.clean_teacher if kind == "clean" else config.robust_teacher
    trained_here = not given or os.path.abspath(given) == os.path.abspath(
        os.path.join(config.model_dir, "teachers", f"{kind}.keras"))
    method = "natural" if kind == "clean" else config.robust_method
    arch = config.clean_teacher_arch if kind == "clean" else config.robust_teacher_arch
    return _row(f"{kind} teacher", "teacher", method if trained_here else "given",
                TEACHER_METHODS.get(method, method) if trained_here else "(given file)",
                arch if trained_here else os.path.basename(path), path, report,
                os.path.join(config.model_dir, "teachers", f"{kind}.json"))


def _row(name, role, method, display_name, arch, path, report, metrics_file):
    attacks = report["attacks"]
    row = {"name": name, "role": role, "method": method, "display_name": display_name, "model": arch,
           "path": path, "num_examples": attacks["clean"]["num_examples"],
           "accuracy": {attack: result["accuracy"] for attack, result in attacks.items()},
           "w_robust": {attack: result["w_robust"] for attack, result in attacks.items()},
           "eval_seconds": round(sum(result["seconds"] for result in attacks.values()), 1),
           "sanity_violations": report.get("sanity", {}).get("violations")}
    if os.path.exists(metrics_file):
        with open(metrics_file) as f:
            row["train_seconds"] = json.load(f).get("train_seconds")
    return row


def robust_attack(attacks):
    """The strongest evaluated attack (AutoAttack when evaluated), or None when only clean accuracy exists."""
    return next((name for name in ROBUST_PREFERENCE if name in attacks), None)


def student_config(config, method):
    """The run configuration of one method's student: its own directory under `<model_dir>/students/`."""
    from mtard_tf.distiller import BALANCES
    return dataclasses.replace(config, model_dir=os.path.join(config.model_dir, "students", method), method=method,
                               balance=method if method in BALANCES else config.balance)


def reproduce(config, eval_config, methods, strategy):
    """Teachers, one student per method, evaluation of all; writes comparison.{md,json} and tradeoff.png.

    Returns the comparison (the content of comparison.json).
    """
    from mtard_tf import baselines, pipeline

    for method in methods:
        baselines.get_method(method)  # an unknown name fails before hours of training
    start = time.time()
    timed = pipeline.StageTimer()
    clean_path = timed("clean teacher", pipeline.teacher_stage, config, "clean", strategy)
    robust_path = timed("robust teacher", pipeline.teacher_stage, config, "robust", strategy)
    teacher_config = dataclasses.replace(config, clean_teacher=clean_path, robust_teacher=robust_path)
    rows = []
    for kind, path in (("clean", clean_path), ("robust", robust_path)):
        report = timed(f"evaluate {kind} teacher", pipeline.evaluate_stage, config, eval_config, path,
                       os.path.join(config.model_dir, "eval", f"{kind}_teacher"))
        rows.append(_teacher_row(config, kind, path, report))
    for method in methods:
        method_config = student_config(teacher_config, method)
        print(f"== {method} ==")
        path = timed(f"student {method}", pipeline.student_stage, method_config, strategy)
        report = timed(f"evaluate {method}", pipeline.evaluate_stage, method_config, eval_config, path,
                       os.path.join(method_config.model_dir, "eval"))
        rows.append(_row(method, "student", method, baselines.METHODS[method].display_name, config.student, path,
                         report, os.path.join(method_config.model_dir, "student.json")))

    attacks = [name for name in rows[0]["accuracy"]]
    comparison = {
        "dataset": config.dataset, "seed": config.seed, "epsilon": config.epsilon, "student": config.student,
        "epochs": config.epochs, "steps_per_epoch": config.steps_per_epoch, "batch_size": config.batch_size,
        "num_examples": rows[0]["num_examples"], "attacks": attacks, "w_robust_attack": robust_attack(attacks),
        "methods": list(methods), "rows": rows,
        "stage_seconds": {name: round(seconds, 1) for name, seconds in timed.seconds.items()},
        "wall_seconds": round(time.time() - start, 1),
    }
    write_comparison(config.model_dir, comparison)
    return comparison


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _percent(value):
    return "–" if value is None else f"{100 * value:.2f}"


def format_markdown(comparison):
    """The paper's table layout: one row per model, accuracy (%) per attack and W-Robust; best student in bold."""
    from mtard_tf.evaluation import DISPLAY_NAMES

    attacks, rows = comparison["attacks"], comparison["rows"]
    w_attack = comparison["w_robust_attack"]
    columns = [(DISPLAY_NAMES.get(a, a), lambda r, a=a: r["accuracy"].get(a)) for a in attacks]
    if w_attack:
        columns.append(("W-Robust", lambda r: r["w_robust"].get(w_attack)))
    students = [r for r in rows if r["role"] == "student"]
    best = [max((value(r) for r in students if value(r) is not None), default=None) for _, value in columns]
    steps, epochs = comparison["steps_per_epoch"], comparison["epochs"]
    schedule = f"{epochs} epoch{'s' * (epochs != 1)}" + (f" of {steps} step{'s' * (steps != 1)}" if steps else "")
    lines = [f"# Student training methods compared, {comparison['dataset']}", "",
             f"Student {comparison['student']}, {schedule} of {comparison['batch_size']} images, seed "
             f"{comparison['seed']}; the same initialisation, data order and attack budget for every method. "
             f"Accuracy (%) on the first {comparison['num_examples']} test images, L∞ ε = "
             f"{comparison['epsilon'] * 255:.4g}/255.", "",
             "| Model | Method | " + " | ".join(name for name, _ in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = []
        for (_, value), top in zip(columns, best):
            text = _percent(value(row))
            if row["role"] == "student" and top is not None and value(row) == top and len(students) > 1:
                text = f"**{text}**"
            cells.append(text)
        role = "Teacher" if row["role"] == "teacher" else "Student"
        lines.append(f"| {role} ({row['model']}) | {row['display_name']} | " + " | ".join(cells) + " |")
    lines.append("")
    if w_attack:
        lines.append(f"W-Robust = (Clean + {DISPLAY_NAMES.get(w_attack, w_attack)}) / 2 (every attack's W-Robust "
                     "is in comparison.json). Bold: the best student in each column.")
    timings = [f"{r['name']} {_duration(r['train_seconds'])}" for r in rows if r.get("train_seconds") is not None]
    if timings:
        lines.append("")
        lines.append("Training wall time: " + ", ".join(timings) + ".")
    violations = [r["name"] for r in rows if r.get("sanity_violations")]
    if violations:
        lines.append("")
        lines.append(f"**The evaluation's sanity check failed for: {', '.join(violations)}** (see their "
                     "report.md: a broken attack or gradient masking).")
    lines.append("")
    lines.append(f"Wall time of the command that wrote this table: {_duration(comparison['wall_seconds'])} (stages it "
                 "reused count as ~0).")
    return "\n".join(lines) + "\n"


def plot_tradeoff(comparison, path):
    """Clean accuracy (y) against the strongest attack's accuracy (x), one labelled point per model; atomic."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtard_tf.evaluation import DISPLAY_NAMES

    attack = comparison["w_robust_attack"] or "clean"
    figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    labels = {}  # (x, y) -> the models at that point, so that coinciding points get one readable label
    for role, marker, color in (("teacher", "s", "tab:gray"), ("student", "o", "tab:blue")):
        rows = [r for r in comparison["rows"] if r["role"] == role]
        xs = [100 * r["accuracy"][attack] for r in rows]
        ys = [100 * r["accuracy"]["clean"] for r in rows]
        axes.scatter(xs, ys, marker=marker, color=color, label=f"{role}s", zorder=3)
        for row, x, y in zip(rows, xs, ys):
            name = f"{row['display_name']} teacher" if role == "teacher" else row["display_name"]
            labels.setdefault((round(x, 2), round(y, 2)), []).append(name)
    for (x, y), names in labels.items():
        axes.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.margins(x=0.25, y=0.1)
    axes.set_xlabel(f"{DISPLAY_NAMES.get(attack, attack)} accuracy (%)")
    axes.set_ylabel("Clean accuracy (%)")
    axes.set_title(f"Clean vs robust accuracy, {comparison['dataset']}, first {comparison['num_examples']} test "
                   "images", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    temporary = os.path.join(os.path.dirname(os.path.abspath(path)), f".partial-{os.getpid()}-tradeoff.png")
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def write_comparison(model_dir, comparison):
    from mtard_tf import evaluation, training

    os.makedirs(model_dir, exist_ok=True)
    training.write_json(os.path.join(model_dir, "comparison.json"), comparison)
    markdown = format_markdown(comparison)
    evaluation._write_atomically(os.path.join(model_dir, "comparison.md"), markdown)
    plot_tradeoff(comparison, os.path.join(model_dir, "tradeoff.png"))
    print(markdown)
    names = ("comparison.md", "comparison.json", "tradeoff.png")
    print("written: " + ", ".join(os.path.join(model_dir, name) for name in names))


def _run():
    if FLAGS.strategy != "mirrored":
        # Evaluations run between the students' trainings on the chief alone; other workers would wait in a
        # collective for as long as an AutoAttack takes.
        raise ValueError("reproduce runs with --strategy=mirrored only (train a single method on several workers "
                         "with mtard_tf.main --strategy=multi_worker)")
    reproduce(cli.run_config(), cli.eval_config(), tuple(FLAGS.methods), cli.make_strategy())


def main(argv):
    return cli.run_guarded(argv, _run)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
