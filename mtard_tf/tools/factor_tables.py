"""Tables of a factor study from evaluations already written: python -m mtard_tf.tools.factor_tables --spec=FILE
--output_dir=DIR [--allow_pending].

A factor study varies one thing at a time (the loss scale, the teachers, the budget) and compares each variant's
student with the student it varies, its baseline, on the same test images. The spec is a JSON file:

    {"title": "...", "factors": [{"name": "loss scale", "question": "...", "rows": [
        {"label": "B-MTARD, kl_scale 10", "eval_dir": "kl10/students/b_mtard/eval",
         "baseline": "baseline/students/b_mtard/eval", "varies": "kl_scale 1 -> 10"}, ...]}, ...]}

with the evaluation directories (report.json and per_image.npz, as `mtard_tf.main` and `mtard_tf.reproduce` write
them) relative to the spec's directory; "title", "question", "varies", a row's "baseline_label" (the baseline's
row label, default: its eval_dir as written) and a factor's "figure" (false: a table only, no panel in factors.png,
e.g. for comparisons across methods rather than a factor's levels) are optional. Each factor is reported on clean
images and under its strongest attack (the strongest one any of its evaluations has, AutoAttack when there; every
evaluation of the factor must have it), and W-Robust = (clean + strongest) / 2. A variant and its baseline must
be evaluations of the same images (equal labels): each accuracy difference is tested by the exact McNemar test on
the per-image flags, which pairs the two models image by image. Into DIR:

    factors.md    one table per factor: the baseline, then each of its variants; accuracy (%) [95% Wilson interval],
                  W-Robust, the difference to the baseline in points with its McNemar p-value, the training time
                  (train_seconds of the student.json beside the eval directory, when there)
    factors.json  the same numbers
    factors.png   clean accuracy against the strongest attack's, a panel per factor: a point per baseline and a
                  labelled arrow from it to each of its variants (not written while no factor has one to draw)

A study that runs over several sittings is tabled as it goes with --allow_pending: the rows whose evaluations are not
written yet are named under "Not measured yet" rather than stopping the command.
"""

import json
import os

from absl import flags

from mtard_tf import files, reproduce
from mtard_tf.errors import UserError
from mtard_tf.job import startup

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """The command's --spec and --output_dir, both required (called by run())."""
    if "spec" in flag_values:
        return
    flags.DEFINE_string("spec", None, "The factor study's JSON spec: {\"title\", \"factors\": [{\"name\", "
                        "\"question\", \"rows\": [{\"label\", \"eval_dir\", \"baseline\", \"varies\"}]}]}, paths "
                        "relative to the spec's directory.", flag_values=flag_values)
    flags.DEFINE_string("output_dir", None, "Where to write factors.md, factors.json and factors.png.",
                        flag_values=flag_values)
    flags.DEFINE_boolean("allow_pending", False, "A study in progress: a row whose evaluation or whose baseline's "
                         "is not written yet (no report.json) is listed under 'Not measured yet' instead of stopping "
                         "the command.", flag_values=flag_values)
    flags.mark_flags_as_required(["spec", "output_dir"], flag_values=flag_values)


# ----------------------------------------------------------------------------------------------------------------
# The spec
# ----------------------------------------------------------------------------------------------------------------


def _text(entry, key, where, required=True):
    """entry[key], a non-empty string ("" when absent and not `required`); UserError at `where` otherwise."""
    value = entry.get(key) if isinstance(entry, dict) else None
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: needs \"{key}\", a non-empty string")
    return value


def _entries(entry, key, where):
    """entry[key], a non-empty list; UserError at `where` otherwise."""
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: needs \"{key}\", a non-empty list")
    return value


def read_spec(path):
    """The spec at `path` as {"title", "factors": [{"name", "question", "figure", "rows": [{"label", "eval_dir",
    "baseline", "baseline_label", "varies"}]}]}, the directories made absolute (relative ones are the spec
    directory's).
    UserError naming the spec and the entry for a file that is not JSON or an entry missing."""
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as error:
        raise UserError(f"--spec={path}: {error.strerror or error}") from None
    except ValueError as error:
        raise UserError(f"--spec={path} is not JSON: {error}") from None
    base = os.path.dirname(os.path.abspath(path))
    read = []
    for index, factor in enumerate(_entries(spec, "factors", f"--spec={path}")):
        where = f"--spec={path}, factor {index + 1}"
        name = _text(factor, "name", where)
        read_rows = []
        for row_index, row in enumerate(_entries(factor, "rows", f"{where} ({name})")):
            row_where = f"{where} ({name}), row {row_index + 1}"
            baseline = _text(row, "baseline", row_where)
            read_rows.append({"label": _text(row, "label", row_where),
                              "eval_dir": os.path.join(base, _text(row, "eval_dir", row_where)),
                              "baseline": os.path.join(base, baseline),
                              "baseline_label": _text(row, "baseline_label", row_where, required=False) or baseline,
                              "varies": _text(row, "varies", row_where, required=False)})
        figure = factor.get("figure", True)
        if not isinstance(figure, bool):
            raise UserError(f"{where} ({name}): \"figure\" must be true or false, not {figure!r}")
        read.append({"name": name, "question": _text(factor, "question", where, required=False), "rows": read_rows,
                     "figure": figure})
    return {"title": _text(spec, "title", f"--spec={path}", required=False) or "Factor tables", "factors": read}


# ----------------------------------------------------------------------------------------------------------------
# The numbers
# ----------------------------------------------------------------------------------------------------------------


def _train_seconds(eval_dir):
    """train_seconds of the student.json beside an evaluation directory (`<student dir>/eval`), or None."""
    path = os.path.join(os.path.dirname(os.path.normpath(eval_dir)), "student.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("train_seconds")


def _evaluation(label, eval_dir, per_image, attack):
    """The row of one evaluation: accuracy, its 95% Wilson interval, W-Robust = (clean + attack) / 2."""
    from mtard_tf.evaluation import stats

    flags_by_attack, labels = per_image
    counts = {name: int(flags_by_attack[name].sum()) for name in ("clean", attack)}
    accuracy = {name: count / len(labels) for name, count in counts.items()}
    return {"label": label, "eval_dir": eval_dir, "num_examples": len(labels), "num_correct": counts,
            "accuracy": accuracy, "ci95": {name: list(stats.wilson_interval(count, len(labels)))
                                           for name, count in counts.items()},
            "w_robust": (accuracy["clean"] + accuracy[attack]) / 2.0, "train_seconds": _train_seconds(eval_dir)}


def factor_table(factor):
    """One factor's numbers: its strongest attack, and per baseline (in the order the rows first name it) the
    baseline's evaluation and its variants', each variant with its exact McNemar tests against the baseline."""
    from mtard_tf.evaluation import stats
    from mtard_tf.evaluation.robustness import DISPLAY_NAMES

    directories = list(dict.fromkeys(d for row in factor["rows"] for d in (row["baseline"], row["eval_dir"])))
    per_image = {directory: reproduce.per_image_flags(directory) for directory in directories}
    attack = reproduce.robust_attack({name for flags_by_attack, _ in per_image.values() for name in flags_by_attack})
    if attack is None:
        raise UserError(f"factor '{factor['name']}': no evaluation has an attack beside clean accuracy")
    for directory, (flags_by_attack, _) in per_image.items():
        for name in ("clean", attack):
            if name not in flags_by_attack:
                raise UserError(f"{directory} has no {DISPLAY_NAMES.get(name, name)} evaluation, which factor "
                                f"'{factor['name']}' reports (evaluate it with --attacks=clean,{attack})")
    groups = {}
    for row in factor["rows"]:
        baseline, eval_dir = row["baseline"], row["eval_dir"]
        reproduce.check_same_images(eval_dir, per_image[eval_dir][1], baseline, per_image[baseline][1])
        group = groups.setdefault(baseline, {
            "baseline": _evaluation(row["baseline_label"], baseline, per_image[baseline], attack), "variants": []})
        variant = _evaluation(row["label"], eval_dir, per_image[eval_dir], attack)
        variant["varies"] = row["varies"]
        variant["vs_baseline"] = {name: stats.mcnemar_exact(per_image[eval_dir][0][name], per_image[baseline][0][name])
                                  for name in ("clean", attack)}
        group["variants"].append(variant)
    return {"name": factor["name"], "question": factor["question"], "attack": attack, "groups": list(groups.values())}


def _measured(row):
    return all(os.path.isfile(os.path.join(row[key], "report.json")) for key in ("eval_dir", "baseline"))


def factor_tables(spec_path, output_dir, allow_pending=False):
    """Reads the spec (read_spec) and the evaluations it names; writes factors.md, factors.json and factors.png
    into `output_dir`. Returns the content of factors.json.

    allow_pending: rows whose evaluation or baseline has no report.json yet are left out of the numbers and listed
    as each factor's "pending" (a study in progress); without it they are an error like any missing file."""
    spec = read_spec(spec_path)
    tables = []
    for factor in spec["factors"]:  # every file checked before anything is written
        rows = [row for row in factor["rows"] if not allow_pending or _measured(row)]
        table = (factor_table({**factor, "rows": rows}) if rows else
                 {"name": factor["name"], "question": factor["question"], "attack": None, "groups": []})
        table["pending"] = [row["label"] for row in factor["rows"] if row not in rows]
        table["figure"] = factor["figure"]
        tables.append(table)
    result = {"title": spec["title"], "spec": os.path.abspath(spec_path), "factors": tables,
              "confidence_interval": "95% Wilson score interval",
              "test": "two-sided exact McNemar test against the baseline, paired over the same test images",
              "level": reproduce.SIGNIFICANCE_LEVEL}
    try:
        os.makedirs(output_dir, exist_ok=True)
        files.write_json(os.path.join(output_dir, "factors.json"), result)
        files.write_text(os.path.join(output_dir, "factors.md"), format_markdown(result))
        plot_factors(result, os.path.join(output_dir, "factors.png"))
    except OSError as error:
        raise UserError(f"cannot write to --output_dir={output_dir}: {error.strerror or error}") from None
    return result


# ----------------------------------------------------------------------------------------------------------------
# The files
# ----------------------------------------------------------------------------------------------------------------


def format_markdown(result):
    """factors.md: a section per factor with its question and its table (the baseline, then its variants)."""
    from mtard_tf.evaluation.robustness import DISPLAY_NAMES, format_accuracy

    level = result["level"]
    lines = [f"# {result['title']}", "",
             "Accuracy (%) [95% Wilson interval] on each evaluation's test images; W-Robust = (Clean + the factor's "
             "strongest attack) / 2; Δ: the difference of accuracy to the baseline in percentage points, p: "
             "two-sided exact McNemar test paired over the same images, (x vs y): images only the variant / only "
             f"the baseline gets right; in bold p < {level:g}. Training: the student's training wall time."]
    for factor in result["factors"]:
        lines += ["", f"## {factor['name']}", ""]
        lines += [factor["question"], ""] if factor["question"] else []
        if factor.get("pending"):
            lines += ["Not measured yet: " + "; ".join(factor["pending"]) + ".", ""]
        if not factor["groups"]:
            continue
        attack = DISPLAY_NAMES.get(factor["attack"], factor["attack"])
        sizes = sorted({e["num_examples"] for g in factor["groups"] for e in [g["baseline"], *g["variants"]]})
        lines += [f"{' or '.join(map(str, sizes))} test images; strongest attack: {attack}.", "",
                  f"| Model | Varies | Clean | {attack} | W-Robust | Δ Clean | Δ {attack} | Training |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for group in factor["groups"]:
            for evaluation in [group["baseline"], *group["variants"]]:
                tests = evaluation.get("vs_baseline")
                cells = [evaluation["label"], evaluation.get("varies", "baseline") or "–"]
                cells += [format_accuracy(evaluation["accuracy"][name], evaluation["ci95"][name])
                          for name in ("clean", factor["attack"])]
                cells.append(f"{100 * evaluation['w_robust']:.2f}")
                for name in ("clean", factor["attack"]):
                    text = reproduce.format_paired(tests[name]) if tests else "–"
                    cells.append(f"**{text}**" if tests and tests[name]["p_value"] < level else text)
                seconds = evaluation["train_seconds"]
                cells.append("–" if seconds is None else reproduce.format_duration(seconds))
                lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _point(evaluation, attack):
    """(x, y) of an evaluation in factors.png: (`attack`'s accuracy, clean accuracy) in %."""
    return 100 * evaluation["accuracy"][attack], 100 * evaluation["accuracy"]["clean"]


# How factors.png draws a point by its role: marker colour, marker size (None: matplotlib's default), the label's
# offset in points and its colour (None: the default).
POINT_STYLES = {"baseline": ("tab:gray", None, (5, -10), "tab:gray"), "variant": ("tab:blue", 12, (5, 4), None)}


def point_labels(factor):
    """[(label, (x, y), "baseline" | "variant")] of a factor's panel, one per point: a model that is the variant (or
    the baseline) of several rows, e.g. a teacher compared with two others, is drawn and labelled once, under its
    first row's label (points are told apart by their coordinates, so two models with equal accuracies share one)."""
    labels, seen = [], set()
    for group in factor["groups"]:
        for role, evaluation in [("baseline", group["baseline"])] + [("variant", v) for v in group["variants"]]:
            point = _point(evaluation, factor["attack"])
            if point not in seen:
                seen.add(point)
                labels.append((evaluation["label"], point, role))
    return labels


def plotted_factors(result):
    """The factors of factors.png: those with a measured row and not marked "figure": false."""
    return [factor for factor in result["factors"] if factor["groups"] and factor["figure"]]


def plot_factors(result, path):
    """factors.png: clean accuracy (y) against the factor's strongest attack's (x), a panel per factor; a point
    per baseline and an arrow from it to each of its variants, labelled; atomic. With no factor to draw (nothing
    measured yet, or every factor "figure": false) no file, and an earlier one at `path` is removed."""
    factors = plotted_factors(result)
    if not factors:
        if os.path.exists(path):
            os.remove(path)
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(factors), 3)
    rows = -(-len(factors) // columns)
    figure, panels = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.4 * rows), dpi=120, squeeze=False)
    for axes, factor in zip(panels.flat, factors):
        attack = factor["attack"]
        for group in factor["groups"]:
            start = _point(group["baseline"], attack)
            for variant in group["variants"]:
                axes.annotate("", _point(variant, attack), start,
                              arrowprops=dict(arrowstyle="->", color="tab:blue", lw=1.2))
        for label, (x, y), role in point_labels(factor):
            color, size, offset, label_color = POINT_STYLES[role]
            axes.scatter([x], [y], color=color, s=size, zorder=3)
            axes.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=8, color=label_color)
        for role, (color, size, _, _) in POINT_STYLES.items():
            axes.scatter([], [], color=color, s=size, label=role)  # the legend's entries
        reproduce.finish_tradeoff_axes(axes, attack)
        axes.set_title(factor["name"], fontsize=10)
        axes.legend(loc="best", fontsize=8)
    for axes in list(panels.flat)[len(factors):]:
        axes.set_visible(False)
    figure.suptitle(result["title"], fontsize=11)
    return files.save_figure(figure, path)


def main(argv):
    del argv  # startup.parse_flags refuses positional arguments
    verbose = FLAGS["verbosity"].present
    startup.start_tensorflow(verbose)  # the evaluation's per-image files are read by a module that imports it
    factor_tables(FLAGS.spec, FLAGS.output_dir, FLAGS.allow_pending)  # a UserError is one line (startup.run_app)
    print("written: " + ", ".join(os.path.join(FLAGS.output_dir, name)
                                  for name in ("factors.md", "factors.json", "factors.png")))
    return 0


def run():
    define_flags()
    startup.run_app(main)


if __name__ == "__main__":
    run()
