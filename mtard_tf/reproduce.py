"""The paper's comparison at any scale: python -m mtard_tf.reproduce --flagfile=flags/cpu_small.cfg [--methods=...].

Trains (or reuses) the two teachers once, then one student per method and seed (the methods compared in Zhao et
al., B-MTARD, TPAMI 2024) with the same architecture, initialisation, data order and teachers, evaluates teachers
and students with the same attacks (the paper's evaluation protocol), and writes into --model_dir:

    comparison.md    the paper's table: Clean, FGSM, PGD-SAT, PGD-TRADES, CW-inf, AutoAttack, W-Robust, each
                     accuracy with its 95% Wilson interval (or mean ± std over --seeds), and in bold the students that
                     differ from B-MTARD at p < 0.05 (exact McNemar test, paired over the same test images)
    comparison.json  the same numbers (and every attack's W-Robust, per-seed results, the paired tests, the recipes,
                     file paths, wall times)
    tradeoff.png     clean accuracy against AutoAttack accuracy, one labelled point per model

--recipe=equal trains every method with the same configuration (these flags). --recipe=reference trains each method
with its reference recipe, `<recipe_dir>/<method>.cfg` (`--flag=value` lines overriding the run's flags),
whose epochs and milestones, given in the reference's epochs, are scaled by --epochs / 300 (B-MTARD's reference
trains 300 epochs). --seeds=0,1,2 trains every method's student once per seed; the teachers are shared (--seed).

A --methods entry METHOD@VARIANT (e.g. --methods=b_mtard,b_mtard@kl10) is a variant of a method: its student
trains with the flags of `<variant_dir>/<VARIANT>.cfg` (`--flag=value` lines, the refusals of a recipe) on top of the
method's (the run's flags, after the method's reference recipe with --recipe=reference; a variant's values are taken
as written, not scaled). Its row is "B-MTARD @kl10"; besides the test against B-MTARD it is tested against the row
of its own method when that method is in --methods too (`vs_base`, † in comparison.md).

Layout: `<model_dir>/teachers/{clean,robust}.keras` and `<model_dir>/eval/{clean,robust}_teacher/` (shared with
--mode=all), `<model_dir>/students/<method>/` (student.keras, student.json, eval/, tensorboard/, checkpoints/),
`<model_dir>/students/<method>@<variant>/` for a variant;
`students-reference/` instead of `students/` for --recipe=reference, and a `seed<k>/` level below `<method>/` unless
the only seed is --seed. Every stage whose output exists and is valid is reused, and an interrupted training resumes
from its last checkpoint, so re-running the command continues where it stopped. Every flag of mtard_tf.main applies
(`--method` is replaced by `--methods`).
"""

import json
import os
import re
import time

from absl import flags

from mtard_tf import config as config_lib, files
from mtard_tf.errors import UserError
from mtard_tf.job import startup

FLAGS = flags.FLAGS
RECIPES = ("equal", "reference")


def define_flags(flag_values=FLAGS):
    """Every configuration flag (config.define_flags) and the command's own (called by run())."""
    config_lib.define_flags(flag_values)
    if "methods" in flag_values:
        return
    flags.DEFINE_list("methods", list(config_lib.METHOD_NAMES), "Student methods to train and compare, in table "
                      "order. An entry METHOD@VARIANT (e.g. b_mtard@kl10) is a variant of the method: its student "
                      "trains with the flags of <variant_dir>/VARIANT.cfg on top of the method's, in "
                      "students/METHOD@VARIANT/, and is also tested against METHOD's row when METHOD is listed.",
                      flag_values=flag_values)
    flags.register_validator("methods", _valid_entries,
                             f"--methods must be distinct names from {','.join(config_lib.METHOD_NAMES)}, each "
                             "alone or as METHOD@VARIANT (VARIANT: letters, digits, '_', '.', '-')",
                             flag_values=flag_values)
    flags.DEFINE_list("seeds", None, "Seeds of the students: every method's student is trained and evaluated once "
                      "per seed (the teachers once, with --seed); comparison.md then shows mean ± std over the seeds "
                      "and the per-seed tests. Default: --seed.", flag_values=flag_values)
    flags.register_validator("seeds", lambda v: v is None or (bool(v) and all(s.strip().isdigit() for s in v)
                                                              and len({int(s) for s in v}) == len(v)),
                             "--seeds must be distinct non-negative integers, e.g. --seeds=0,1,2",
                             flag_values=flag_values)
    flags.DEFINE_enum("recipe", "equal", RECIPES,
                      "equal: every method trains with the same configuration (these flags). reference: each method "
                      "with its reference recipe <recipe_dir>/<method>.cfg (--field=value lines), its epochs and "
                      "milestones scaled by --epochs / 300.", flag_values=flag_values)
    flags.DEFINE_string("recipe_dir", None, "Directory of the --recipe=reference files <method>.cfg (default: "
                        "flags/methods of this repository).", flag_values=flag_values)
    flags.DEFINE_string("variant_dir", None, "Directory of the variant files <VARIANT>.cfg of --methods entries "
                        "METHOD@VARIANT (default: flags/variants of this repository).", flag_values=flag_values)


TEACHER_METHODS = {"natural": "Natural", "trades": "TRADES", "pgd_at": "SAT"}
# The attack of the W-Robust column and of the trade-off plot's x axis: the strongest one evaluated.
ROBUST_PREFERENCE = ("autoattack", "cw", "pgd_trades", "pgd_sat", "fgsm")
# Every student is tested against this method's student of the same seed (exact McNemar, paired over the images).
BASELINE = "b_mtard"
SIGNIFICANCE_LEVEL = 0.05
FLAGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flags")
RECIPE_DIR = os.path.join(FLAGS_DIR, "methods")
VARIANT_DIR = os.path.join(FLAGS_DIR, "variants")
# A --methods entry METHOD@VARIANT; VARIANT names a file and a directory, so it is a plain file name.
VARIANT_SEPARATOR = "@"
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# The recipes give epochs and milestones in the reference's epochs; B-MTARD's reference trains 300.
REFERENCE_EPOCHS = 300
# Flags a recipe or a variant may not set: reproduce sets them for every method alike, or they configure the
# teachers, which all methods share (trained once with the run's flags).
NOT_IN_RECIPES = {
    **{name: "the data" for name in ("dataset", "data_dir", "download", "manual_dir")},
    "model_dir": "the output directories", "seed": "the seeds", "method": "the method",
    "student": "the student architecture",
    **{option.name: "the teachers" for option in config_lib.options() if option.path[0].endswith("_teacher")},
    **{option.name: "the model selection" for option in config_lib.options() if option.path[0] == "selection"},
    **{option.name: "the evaluation" for option in config_lib.options() if option.path[0] in ("eval", "export")},
}


# ----------------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------------


def read_recipe(path, kind="recipe"):
    """{flag name: value} of a recipe or variant file (`--name=value` lines, `#` comments), parsed with the run's
    own flags (config.read_flagfile). ConfigError naming the file for an unknown flag, a bad value or a setting that
    a recipe may not change (NOT_IN_RECIPES; `kind` names the file's role in that message)."""
    overrides = config_lib.read_flagfile(path)
    for name in overrides:
        if name in NOT_IN_RECIPES:
            raise config_lib.ConfigError(f"{path}: --{name} cannot be part of a method's {kind} (reproduce sets "
                                         f"{NOT_IN_RECIPES[name]} for every method alike)")
    return overrides


def parse_methods(entries):
    """[(method, variant or None)] of --methods entries `METHOD` or `METHOD@VARIANT`, in their order.

    ConfigError for an unknown method, a variant that is not a plain file name (VARIANT_NAME), or an entry given
    twice.
    """
    parsed = []
    for entry in entries:
        method, separator, variant = entry.partition(VARIANT_SEPARATOR)
        if method not in config_lib.METHOD_NAMES:
            raise config_lib.ConfigError(f"--methods: unknown method '{method}' in '{entry}', expected one of "
                                         f"{','.join(config_lib.METHOD_NAMES)}")
        if separator and not VARIANT_NAME.fullmatch(variant):
            raise config_lib.ConfigError(f"--methods: '{entry}' names no variant file: VARIANT in METHOD@VARIANT is "
                                         "letters, digits, '_', '.' and '-'")
        if (method, variant or None) in parsed:
            raise config_lib.ConfigError(f"--methods: '{entry}' is given twice")
        parsed.append((method, variant or None))
    return parsed


def _valid_entries(entries):
    try:
        return bool(parse_methods(entries))
    except config_lib.ConfigError:
        return False


def entry_name(method, variant=None):
    """The --methods entry of a method or of one of its variants: 'b_mtard', 'b_mtard@kl10'."""
    return method if variant is None else f"{method}{VARIANT_SEPARATOR}{variant}"


def method_variant(variant, variant_dir=None):
    """({flag: value} overrides of a variant, its record for comparison.json), ({}, None) for no variant.

    The overrides are `<variant_dir>/<variant>.cfg` (read_recipe: a variant may change what a recipe may).
    """
    if variant is None:
        return {}, None
    path = os.path.join(variant_dir or VARIANT_DIR, f"{variant}.cfg")
    if not os.path.isfile(path):
        raise config_lib.ConfigError(f"--methods: no variant '{variant}' ({path} does not exist; give --variant_dir, "
                                     "or write the file)")
    overrides = read_recipe(path, kind="variant")
    return overrides, {"name": variant, "file": os.path.abspath(path),
                       "overrides": {name: _jsonable(value) for name, value in overrides.items()}}


def scale_schedule(config, overrides):
    """(epochs, milestones) of a recipe run with the run's epochs E in place of the reference's 300.

    With scale = E / 300, the method trains round(recipe epochs x scale) epochs (at least 1; 300 when the
    recipe gives none), each recipe milestone m becomes round(m x scale); without recipe milestones, the run's
    milestones are stretched to the method's epochs. Milestones outside [1, epochs) are dropped.
    """
    scale = config.schedule.epochs / REFERENCE_EPOCHS
    epochs = max(1, round(overrides.get("epochs", REFERENCE_EPOCHS) * scale))
    if "milestones" in overrides:
        milestones = [round(m * scale) for m in overrides["milestones"]]
    else:
        milestones = [round(m * epochs / config.schedule.epochs) for m in config.schedule.milestones]
    return epochs, tuple(sorted({m for m in milestones if 1 <= m < epochs}))


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def method_recipe(config, method, recipe="equal", recipe_dir=None):
    """({flag: value} overrides of `method`'s student, the record of the recipe for comparison.json).

    equal: no overrides. reference: `<recipe_dir>/<method>.cfg` (read_recipe) with its schedule scaled
    (scale_schedule).
    """
    if recipe == "equal":
        return {}, {"name": "equal", "file": None, "overrides": {}, "applied": {}}
    if recipe != "reference":
        raise config_lib.ConfigError(f"unknown recipe '{recipe}', expected one of {', '.join(RECIPES)}")
    path = os.path.join(recipe_dir or RECIPE_DIR, f"{method}.cfg")
    if not os.path.isfile(path):
        raise config_lib.ConfigError(f"--recipe=reference: no recipe for method '{method}' ({path} does not exist; give "
                         "--recipe_dir, or leave the method out of --methods)")
    overrides = read_recipe(path)
    epochs, milestones = scale_schedule(config, overrides)
    applied = {**overrides, "epochs": epochs, "milestones": milestones}
    return applied, {"name": "reference", "file": os.path.abspath(path),
                     "overrides": {name: _jsonable(value) for name, value in overrides.items()},
                     "applied": {name: _jsonable(value) for name, value in applied.items()},
                     "scale": config.schedule.epochs / REFERENCE_EPOCHS}


def entry_settings(config, entries, recipe="equal", recipe_dir=None, variant_dir=None):
    """{entry: (overrides of its student, its recipe record, its variant record or None)} of parsed --methods
    entries (parse_methods): the method's recipe (method_recipe), then the variant's flags (method_variant) on top.

    Every file is read and every student's configuration checked (config.replace), so that a bad recipe or variant
    is a ConfigError before anything trains.
    """
    recipes = {method: method_recipe(config, method, recipe, recipe_dir) for method, _ in entries}
    settings = {}
    for method, variant in entries:
        name = entry_name(method, variant)
        variant_overrides, variant_record = method_variant(variant, variant_dir)
        overrides = {**recipes[method][0], **variant_overrides}
        try:
            config_lib.replace(config, **overrides)
        except config_lib.ConfigError as error:
            raise config_lib.ConfigError(f"--methods entry {name}: {error}") from None
        settings[name] = overrides, recipes[method][1], variant_record
    return settings


def _teacher_row(config, kind, path, report):
    teacher = config.teacher(kind)
    model_dir = config.runtime.model_dir
    trained_here = not teacher.file or os.path.abspath(teacher.file) == os.path.abspath(
        os.path.join(model_dir, "teachers", f"{kind}.keras"))
    return _row(f"{kind} teacher", "teacher", teacher.method if trained_here else "given",
                TEACHER_METHODS.get(teacher.method, teacher.method) if trained_here else "(given file)",
                teacher.arch if trained_here else os.path.basename(path), path, report,
                os.path.join(model_dir, "teachers", f"{kind}.json"))


def _row(name, role, method, display_name, arch, path, report, metrics_file):
    from mtard_tf.evaluation import stats

    attacks = report["attacks"]
    row = {"name": name, "role": role, "method": method, "display_name": display_name, "model": arch,
           "path": path, "num_examples": attacks["clean"]["num_examples"],
           "accuracy": {attack: result["accuracy"] for attack, result in attacks.items()},
           "w_robust": {attack: result["w_robust"] for attack, result in attacks.items()},
           "ci95": {attack: list(result.get("ci95") or stats.wilson_interval(result["num_correct"],
                                                                                 result["num_examples"]))
                    for attack, result in attacks.items()},
           "eval_seconds": round(sum(result["seconds"] for result in attacks.values()), 1),
           "sanity_violations": report.get("sanity", {}).get("violations")}
    if os.path.exists(metrics_file):
        with open(metrics_file) as f:
            metrics = json.load(f)
        row["train_seconds"] = metrics.get("train_seconds")
        if metrics.get("selection") is not None:  # which epoch's weights student.keras holds, when selected
            row["selection"] = metrics["selection"]
    return row


def robust_attack(attacks):
    """The strongest evaluated attack (AutoAttack when evaluated), or None when only clean accuracy exists."""
    return next((name for name in ROBUST_PREFERENCE if name in attacks), None)


def student_dir(model_dir, method, recipe="equal", seed=None, variant=None):
    """`<model_dir>/students/<method>` (`<method>@<variant>` for a variant; `students-<recipe>/` for a recipe other
    than equal), `/seed<seed>` below it when a seed is given (runs of several seeds)."""
    path = os.path.join(model_dir, "students" if recipe == "equal" else f"students-{recipe}",
                        entry_name(method, variant))
    return path if seed is None else os.path.join(path, f"seed{seed}")


def student_config(config, method, seed=None, recipe="equal", variant=None):
    """The run configuration of one method's (or variant's) student, in its own directory (student_dir); `seed`
    (None: the config's, in the directory without a seed level) sets initialisation, data order and attack noise."""
    return config_lib.replace(config, model_dir=student_dir(config.runtime.model_dir, method, recipe, seed, variant),
                              method=method, seed=config.runtime.seed if seed is None else int(seed))


def _evaluate(timed, name, config, model_path, output_dir):
    """pipeline.evaluate_stage, re-evaluating a report written before the per-image flags existed."""
    from mtard_tf.evaluation import robustness
    from mtard_tf.job import stages
    reuse = os.path.exists(os.path.join(output_dir, robustness.PER_IMAGE_FILE))
    return timed(name, stages.evaluate_stage, config, model_path, output_dir, reuse=reuse)


def per_image_flags(eval_dir, attacks=None):
    """({attack: bool flags}, labels) of the evaluation in `eval_dir` (robustness.read_per_image), checked against
    its report.json: `attacks` (default: every attack of the report) must be in both files, with as many robust
    images in the flags as the report counts. UserError naming the file otherwise."""
    from mtard_tf.evaluation import robustness
    report_path = os.path.join(eval_dir, "report.json")
    if not os.path.isfile(report_path):
        raise UserError(f"{report_path} does not exist: no evaluation in {eval_dir}")
    try:
        flags_by_attack, labels = robustness.read_per_image(eval_dir)
        with open(report_path) as f:
            results = json.load(f)["attacks"]
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    except (ValueError, KeyError) as error:
        raise UserError(f"{report_path} is not an evaluation report ({error})") from None
    attacks = list(results) if attacks is None else attacks
    missing = [attack for attack in attacks if attack not in results]
    if missing:
        raise UserError(f"{eval_dir} has no {', '.join(robustness.DISPLAY_NAMES.get(a, a) for a in missing)} "
                        f"evaluation (its report.json has {', '.join(results)})")
    for attack in attacks:
        if attack not in flags_by_attack or int(flags_by_attack[attack].sum()) != results[attack]["num_correct"]:
            raise UserError(f"{os.path.join(eval_dir, robustness.PER_IMAGE_FILE)} does not match report.json for "
                             f"{attack}; re-run the evaluation (delete {report_path} and run the command again)")
    return {attack: flags_by_attack[attack] for attack in attacks}, labels


def check_same_images(eval_dir, labels, other_eval_dir, other_labels):
    """UserError unless two evaluations' labels (per_image_flags) are equal, image by image: a paired test needs
    the same test images in the same order."""
    if labels.shape != other_labels.shape or not (labels == other_labels).all():
        raise UserError(f"the evaluations in {eval_dir} and {other_eval_dir} are not of the same test images "
                         f"({len(labels)} and {len(other_labels)} labels, not equal): re-run them with the same "
                         "--num_eval_examples")


def paired_tests(eval_dir, baseline_eval_dir, attacks):
    """{attack: stats.mcnemar_exact(model flags, baseline flags)} from two evaluations of the same images."""
    from mtard_tf.evaluation import stats
    flags_a, labels_a = per_image_flags(eval_dir, attacks)
    flags_b, labels_b = per_image_flags(baseline_eval_dir, attacks)
    check_same_images(eval_dir, labels_a, baseline_eval_dir, labels_b)
    return {attack: stats.mcnemar_exact(flags_a[attack], flags_b[attack]) for attack in attacks}


def _tested_attacks(attacks):
    strongest = robust_attack(attacks)
    return ["clean"] + ([strongest] if strongest else [])


def _student_row(name, method, display_name, arch, runs, recipe, variant):
    """One method's (or variant's: `variant` its record, None for none) row from its per-seed rows {seed: row}: mean
    and std over seeds; the single seed's ci95 when there is one seed."""
    from mtard_tf.evaluation import stats

    first = next(iter(runs.values()))
    attacks = list(first["accuracy"])
    mean, std = {"accuracy": {}, "w_robust": {}}, {"accuracy": {}, "w_robust": {}}
    for attack in attacks:
        mean["accuracy"][attack], std["accuracy"][attack] = stats.mean_std(
            run["accuracy"][attack] for run in runs.values())
        _, std["w_robust"][attack] = stats.mean_std(run["w_robust"][attack] for run in runs.values())
    for attack in attacks:  # W-Robust of the mean accuracies (= the mean W-Robust)
        mean["w_robust"][attack] = (first["w_robust"][attack] if len(runs) == 1 else
                                    (mean["accuracy"]["clean"] + mean["accuracy"][attack]) / 2.0)
    train_seconds = [run.get("train_seconds") for run in runs.values()]
    violations = [run.get("sanity_violations") for run in runs.values()]
    row = {"name": name, "role": "student", "method": method, "display_name": display_name, "model": arch,
           "path": first["path"], "num_examples": first["num_examples"],
           "accuracy": dict(mean["accuracy"]), "w_robust": dict(mean["w_robust"]), "mean": mean, "std": std,
           "eval_seconds": round(sum(run["eval_seconds"] for run in runs.values()), 1),
           "sanity_violations": None if None in violations else sum(violations), "recipe": recipe,
           "variant": variant, "seeds": {str(seed): run for seed, run in runs.items()}}
    if None not in train_seconds:
        row["train_seconds"] = round(sum(train_seconds), 1)
    if len(runs) == 1:
        row["ci95"] = first["ci95"]
        if "selection" in first:
            row["selection"] = first["selection"]
    return row


def reproduce(config, methods, strategy, seeds=None, recipe="equal", recipe_dir=None, variant_dir=None):
    """Teachers, one student per method and seed, evaluation of all; writes comparison.{md,json} and tradeoff.png.

    methods: --methods entries, `METHOD` or `METHOD@VARIANT` (parse_methods); a variant trains with the flags of
    `<variant_dir>/<VARIANT>.cfg` on top of its method's (method_variant). seeds: the students' seeds (default: the
    run's seed alone); the teachers are trained and evaluated once, with the run's seed. recipe: "equal" (every
    method trains with `config`) or "reference" (each method with `<recipe_dir>/<method>.cfg` on top of `config`,
    see method_recipe). Every student is compared with the B-MTARD student of the same seed (exact McNemar test on
    the clean and the strongest attack's per-image flags, `vs_b_mtard`) when b_mtard is among `methods`, and a
    variant also with its own method's student (`vs_base`) when that method is among them. Returns the comparison
    (the content of comparison.json).
    """
    from mtard_tf.job import stages
    from mtard_tf.methods import registry as method_registry

    entries = parse_methods(methods)
    for method, _ in entries:
        method_registry.get_method(method)  # an unknown name fails before hours of training
    seeds = tuple(int(seed) for seed in seeds) if seeds else (config.runtime.seed,)
    if len(set(seeds)) != len(seeds):
        raise config_lib.ConfigError(f"the seeds must be distinct, got {list(seeds)}")
    seed_dirs = seeds != (config.runtime.seed,)  # a seed level in the student directories
    model_dir = config.runtime.model_dir
    settings = entry_settings(config, entries, recipe, recipe_dir, variant_dir)  # errors first
    start = time.time()
    timed = stages.StageTimer()
    clean_path = timed("clean teacher", stages.teacher_stage, config, "clean", strategy)
    robust_path = timed("robust teacher", stages.teacher_stage, config, "robust", strategy)
    teacher_config = config_lib.replace(config, clean_teacher=clean_path, robust_teacher=robust_path)
    rows = []
    for kind, path in (("clean", clean_path), ("robust", robust_path)):
        report = _evaluate(timed, f"evaluate {kind} teacher", config, path,
                           os.path.join(model_dir, "eval", f"{kind}_teacher"))
        rows.append(_teacher_row(config, kind, path, report))
    eval_dirs = {}  # (entry, seed) -> evaluation directory
    for method, variant in entries:
        name = entry_name(method, variant)
        overrides, recipe_record, variant_record = settings[name]
        display_name = method_registry.METHODS[method].display_name + (f" @{variant}" if variant else "")
        files_used = [record["file"] for record in (recipe_record, variant_record or {}) if record.get("file")]
        runs = {}
        for seed in seeds:
            method_config = student_config(config_lib.replace(teacher_config, **overrides), method,
                                           seed if seed_dirs else None, recipe, variant)
            method_dir = method_config.runtime.model_dir
            label = f"{name}, seed {seed}" if seed_dirs else name
            print(f"== {label} ==" + (f" ({', '.join(files_used)})" if files_used else ""))
            path = timed(f"student {label}", stages.student_stage, method_config, strategy)
            eval_dirs[name, seed] = os.path.join(method_dir, "eval")
            # Every model is evaluated in the run's threat model, whatever radius its recipe trained with.
            report = _evaluate(timed, f"evaluate {label}",
                               config_lib.replace(method_config, epsilon=config.attack.epsilon), path,
                               eval_dirs[name, seed])
            run = _row(name, "student", method, display_name, config.student, path, report,
                       os.path.join(method_dir, "student.json"))
            runs[seed] = {"seed": seed, "model_dir": method_dir, "epochs": method_config.schedule.epochs,
                          **{key: run[key] for key in ("path", "num_examples", "accuracy", "w_robust", "ci95",
                                                       "eval_seconds", "sanity_violations", "train_seconds",
                                                       "selection") if key in run}}
        rows.append(_student_row(name, method, display_name, config.student, runs, recipe_record, variant_record))

    attacks = [name for name in rows[0]["accuracy"]]
    tested = _tested_attacks(attacks)
    names = [entry_name(method, variant) for method, variant in entries]
    baseline = BASELINE if BASELINE in names else None
    for row in rows:
        if row["role"] != "student":
            continue
        # test -> the entry it pairs the row with: B-MTARD's plain student, and a variant's own method
        against = {"vs_b_mtard": baseline if baseline not in (None, row["name"]) else None,
                   "vs_base": row["method"] if row["variant"] and row["method"] in names else None}
        for test, other in against.items():
            if other is None:
                continue
            for seed in seeds:
                row["seeds"][str(seed)][test] = paired_tests(eval_dirs[row["name"], seed], eval_dirs[other, seed],
                                                             tested)
            if len(seeds) == 1:
                row[test] = row["seeds"][str(seeds[0])][test]
    comparison = {
        "dataset": config.data.dataset, "seed": config.runtime.seed, "seeds": list(seeds),
        "epsilon": config.attack.epsilon, "student": config.student, "epochs": config.schedule.epochs,
        "steps_per_epoch": config.schedule.steps_per_epoch, "batch_size": config.schedule.batch_size,
        "precision": config.runtime.precision, "num_examples": rows[0]["num_examples"], "attacks": attacks,
        "w_robust_attack": robust_attack(attacks), "methods": names,
        "recipe": {"name": recipe, "dir": os.path.abspath(recipe_dir or RECIPE_DIR) if recipe != "equal" else None,
                   "reference_epochs": REFERENCE_EPOCHS if recipe != "equal" else None},
        "variant_dir": (os.path.abspath(variant_dir or VARIANT_DIR)
                        if any(variant for _, variant in entries) else None),
        "confidence_interval": "95% Wilson score interval",
        "significance": {"baseline": baseline, "attacks": tested, "level": SIGNIFICANCE_LEVEL,
                         "test": "two-sided exact McNemar test, paired over the same test images, per seed",
                         "variants": "vs_base: a METHOD@VARIANT row against the row of METHOD, when listed"},
        "rows": rows,
        "stage_seconds": {name: round(seconds, 1) for name, seconds in timed.seconds.items()},
        "wall_seconds": round(time.time() - start, 1),
        "config": json.loads(config.to_json()),
    }
    write_comparison(model_dir, comparison)
    return comparison


def format_duration(seconds):
    """'95 s' below two minutes, else '2.5 min'."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _percent(value):
    return "–" if value is None else f"{100 * value:.2f}"


def _setting(value):
    """A recipe value as on a command line: lists comma-separated ('none' when empty)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def format_paired(test):
    """A paired test (stats.mcnemar_exact) as a table cell: '+2.50 pp, p = 0.041 (6 vs 1)', the difference of
    accuracy in percentage points, the exact McNemar p-value, and the images only the model / only the baseline
    gets right (the only images the test uses)."""
    p_value = test["p_value"]
    return (f"{100 * test['difference']:+.2f} pp, p = {f'{p_value:.3f}' if p_value >= 0.001 else f'{p_value:.1e}'} "
            f"({test['a_only']} vs {test['b_only']})")


def _selection_lines(rows):
    """'Model selection: ...' lines from the students' student.json "selection" entries (absent: none)."""
    groups = {}  # (mode, split, criterion) -> ["SAT epoch 3", ...]
    for row in rows:
        if row["role"] != "student":
            continue
        for seed, run in row.get("seeds", {"": row}).items():
            selection = run.get("selection")
            if not isinstance(selection, dict):
                continue
            key = (selection.get("mode"), selection.get("split"), selection.get("metric_name"))
            where = row["display_name"] + (f" seed {seed}" if len(row.get("seeds", {})) > 1 else "")
            if selection.get("epoch") is not None:
                where += f" epoch {selection['epoch']}"
            groups.setdefault(key, []).append(where)
    lines = []
    for (mode, split, metric_name), where in groups.items():
        if mode == "last":
            text = "Model selection: none, the last epoch's model"
        else:
            text = f"Model selection: {mode or 'unspecified'}"
            text += f" {metric_name}" if metric_name else ""
            text += f" on the {split} split" if split else ""
        text += f" ({', '.join(where)})"
        if mode == "best_test" or split == "test":
            text += " — test-selected numbers are optimistic"
        lines.append(text + ".")
    return lines


def _settings_line(row):
    """'- B-MTARD @kl10 (b_mtard.cfg, kl10.cfg): epochs=2, kl_scale=10.0': a student's recipe and variant files and
    the settings they applied (the variant's over the recipe's)."""
    records = [record for record in (row.get("recipe"), row.get("variant")) if record and record.get("file")]
    applied = {**(row.get("recipe") or {}).get("applied", {}), **(row.get("variant") or {}).get("overrides", {})}
    settings = ", ".join(f"{name}={_setting(value)}" for name, value in applied.items())
    return (f"- {row['display_name']} ({', '.join(os.path.basename(r['file']) for r in records) or '-'}): "
            f"{settings or 'no overrides'}")


def _paired_differences(rows, seeds, tested, level, test_name, title, against):
    """The section of comparison.md on the paired tests `test_name` of `rows` (none when no row has them): per row
    (and seed), each tested attack's difference, p-value and discordant counts; `against(row)` names what the row is
    compared with."""
    from mtard_tf.evaluation.robustness import DISPLAY_NAMES

    several = len(seeds) > 1
    compared = [(seed, row, run) for seed in seeds for row in rows
                for run in [row["seeds"][str(seed)] if "seeds" in row else row] if run.get(test_name)]
    if not compared:
        return []
    against_names = list(dict.fromkeys(against(row) for _, row, _ in compared))
    lines = ["", f"## Paired differences {title}", "",
             ("| Seed " if several else "") + "| Method | " + ("Against | " if len(against_names) > 1 else "")
             + " | ".join(DISPLAY_NAMES.get(a, a) for a in tested) + " |",
             ("|---" if several else "") + "|---|" + ("---|" if len(against_names) > 1 else "")
             + "---:|" * len(tested)]
    for seed, row, run in compared:
        out = []
        for attack in tested:
            test = run[test_name][attack]
            text = format_paired(test)
            out.append(f"**{text}**" if test["p_value"] < level else text)
        lines.append((f"| {seed} " if several else "") + f"| {row['display_name']} | "
                     + (f"{against(row)} | " if len(against_names) > 1 else "") + " | ".join(out) + " |")
    other = against_names[0] if len(against_names) == 1 else "the method it is compared with"
    lines += ["", f"Difference of accuracy to {other} in percentage points; p: two-sided exact McNemar test; "
              f"(x vs y): images only this {'method' if test_name == 'vs_b_mtard' else 'variant'} / only {other} "
              "gets right (the only images the test uses)."]
    return lines


def format_markdown(comparison):
    """The paper's table layout: one row per model, accuracy (%) per attack and W-Robust.

    One seed: each accuracy with its 95% Wilson interval, in bold where the student differs from B-MTARD at
    p < 0.05 (exact McNemar test), then the paired differences. Several seeds: students' mean ± std over the seeds,
    then a per-seed table (intervals, bold as above) and the per-seed paired differences.
    """
    from mtard_tf.evaluation.robustness import DISPLAY_NAMES, format_accuracy

    attacks, rows = comparison["attacks"], comparison["rows"]
    w_attack = comparison["w_robust_attack"]
    seeds = comparison.get("seeds") or [comparison["seed"]]
    several = len(seeds) > 1
    significance = comparison.get("significance") or {}
    baseline, tested = significance.get("baseline"), significance.get("attacks") or []
    level = significance.get("level", SIGNIFICANCE_LEVEL)
    recipe = comparison.get("recipe") or {"name": "equal"}
    students = [r for r in rows if r["role"] == "student"]
    baseline_name = next((r["display_name"] for r in students if r["name"] == baseline), "B-MTARD")
    variants = [r for r in students if r.get("variant")]

    def significant(run, attack, test_name="vs_b_mtard"):
        test = (run.get(test_name) or {}).get(attack)
        return test is not None and test["p_value"] < level

    def cells(run, role, spread=None):
        """Accuracy cells of one evaluation: with CIs, or mean ± std (`spread`); bold where significant."""
        out = []
        for attack in attacks:
            if spread is not None:
                std = spread["accuracy"].get(attack)
                text = _percent(run["accuracy"].get(attack)) + (f" ± {100 * std:.2f}" if std is not None else "")
            else:
                ci95 = (run.get("ci95") or {}).get(attack)
                text = format_accuracy(run["accuracy"][attack], ci95)
                if role == "student" and significant(run, attack):
                    text = f"**{text}**"
                if role == "student" and significant(run, attack, "vs_base"):
                    text += " †"
            out.append(text)
        if w_attack:
            text = _percent(run["w_robust"].get(w_attack))
            if spread is not None and spread["w_robust"].get(w_attack) is not None:
                text += f" ± {100 * spread['w_robust'][w_attack]:.2f}"
            out.append(text)
        return out

    names = [DISPLAY_NAMES.get(a, a) for a in attacks] + (["W-Robust"] if w_attack else [])
    steps, epochs = comparison["steps_per_epoch"], comparison["epochs"]
    schedule = f"{epochs} epoch{'s' * (epochs != 1)}" + (f" of {steps} step{'s' * (steps != 1)}" if steps else "")
    seed_text = (f"seeds {', '.join(map(str, seeds))} (teachers: seed {comparison['seed']})" if several
                 else f"seed {seeds[0]}")
    if recipe["name"] == "reference":
        per_epoch = f", {steps} step{'s' * (steps != 1)} per epoch" if steps else ""
        recipe_text = (f"Recipe **reference**: each method trains with its reference recipe ({recipe.get('dir')}/"
                       f"<method>.cfg), its epochs and milestones scaled by {epochs}/{recipe.get('reference_epochs')}"
                       f" (this run's --epochs over the {recipe.get('reference_epochs')} epochs of B-MTARD's "
                       f"reference; the settings applied are listed below); the same student "
                       f"{comparison['student']}, teachers, initialisation and data order{per_epoch}, {seed_text}.")
    else:
        recipe_text = (f"Recipe **equal**: student {comparison['student']}, {schedule} of "
                       f"{comparison['batch_size']} images, {seed_text}; the same initialisation, data order, "
                       "schedule and attack budget for every method" + (
                           " (a METHOD @VARIANT row: the method with the variant's flags, listed below)."
                           if variants else "."))
    lines = [f"# Student training methods compared, {comparison['dataset']} (recipe: {recipe['name']})", "",
             recipe_text + f" Accuracy (%) on the first {comparison['num_examples']} test images, L∞ ε = "
             f"{comparison['epsilon'] * 255:.4g}/255.", "",
             "| Model | Method | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for row in rows:
        role = "Teacher" if row["role"] == "teacher" else "Student"
        spread = row.get("std") if several and row["role"] == "student" else None
        body = cells(row, row["role"], spread) if spread is None else cells(row["mean"], row["role"], spread)
        lines.append(f"| {role} ({row['model']}) | {row['display_name']} | " + " | ".join(body) + " |")
    lines.append("")
    tested_names = " and ".join(DISPLAY_NAMES.get(a, a) for a in tested)
    bold = (f"**Bold**: differs from {baseline_name} at p < {level:g} (two-sided exact McNemar test on "
            f"{tested_names}, paired over the same test images"
            + (", same seed)." if several else ").")) if baseline else (
        "No significance tests: B-MTARD is not among the methods.")
    if several:
        lines.append(f"Students: mean ± sample standard deviation over {len(seeds)} seeds; teachers (one run): "
                     "accuracy [95% Wilson confidence interval]. Per-seed intervals and tests below.")
    else:
        lines.append("Accuracy [95% Wilson confidence interval over the test images]. " + bold)
    dagger = (f"†: a variant that differs from its own method's row at p < {level:g} (the same test; below).")
    if not several and any(r.get("vs_base") for r in variants):
        lines.append(dagger)
    if w_attack:
        lines.append(f"W-Robust = (Clean + {DISPLAY_NAMES.get(w_attack, w_attack)}) / 2 (every attack's W-Robust "
                     "is in comparison.json).")

    if several:
        lines += ["", "## Per seed", "", "| Seed | Method | " + " | ".join(names) + " |",
                  "|---|---|" + "---:|" * len(names)]
        for seed in seeds:
            for row in students:
                run = row["seeds"][str(seed)]
                lines.append(f"| {seed} | {row['display_name']} | " + " | ".join(cells(run, "student")) + " |")
        lines += ["", "Accuracy [95% Wilson confidence interval]. " + bold]
        if any(run.get("vs_base") for r in variants for run in r["seeds"].values()):
            lines.append(dagger)

    lines += _paired_differences(students, seeds, tested, level, "vs_b_mtard", f"to {baseline_name}",
                                 lambda row: baseline_name)
    lines += _paired_differences(variants, seeds, tested, level, "vs_base", "of the variants to their methods",
                                 lambda row: next(r["display_name"] for r in students if r["name"] == row["method"]))

    if recipe["name"] == "reference":
        lines += ["", "Recipes applied (after scaling" + ("; a variant's flags on top, as written" if variants else "")
                  + "):", ""]
        lines += [_settings_line(row) for row in students]
    elif variants:
        lines += ["", "Variants (their flags on top of the run's):", ""]
        lines += [_settings_line(row) for row in variants]
    for line in _selection_lines(rows):
        lines += ["", line]
    timings = [f"{r['name']} {format_duration(r['train_seconds'])}" for r in rows
               if r.get("train_seconds") is not None]
    if timings:
        lines.append("")
        lines.append("Training wall time" + (" (all seeds)" if several else "") + ": " + ", ".join(timings) + ".")
    violations = [r["name"] for r in rows if r.get("sanity_violations")]
    if violations:
        lines.append("")
        lines.append(f"**The evaluation's sanity check failed for: {', '.join(violations)}** (see their "
                     "report.md: a broken attack or gradient masking).")
    lines.append("")
    lines.append(f"Wall time of the command that wrote this table: {format_duration(comparison['wall_seconds'])} "
                 "(stages it reused count as ~0).")
    return "\n".join(lines) + "\n"


def plot_tradeoff(comparison, path):
    """Clean accuracy (y) against the strongest attack's accuracy (x), one labelled point per model; atomic."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    finish_tradeoff_axes(axes, attack)
    several = len(comparison.get("seeds") or ()) > 1
    axes.set_title(f"Clean vs robust accuracy, {comparison['dataset']}, first {comparison['num_examples']} test "
                   "images" + (f"\n(students: mean over {len(comparison['seeds'])} seeds)" if several else ""),
                   fontsize=10)
    axes.legend(loc="best", fontsize=8)
    return files.save_figure(figure, path)


def finish_tradeoff_axes(axes, attack):
    """The axes of a clean-vs-robust picture, once its points are drawn: room for the labels (but not for negative
    accuracies), the axis titles (x: `attack`'s accuracy), a light grid."""
    from mtard_tf.evaluation.robustness import DISPLAY_NAMES

    axes.margins(x=0.25, y=0.1)
    low, high = axes.get_xlim()
    axes.set_xlim(left=max(low, -0.02 * high))
    axes.set_xlabel(f"{DISPLAY_NAMES.get(attack, attack)} accuracy (%)")
    axes.set_ylabel("Clean accuracy (%)")
    axes.grid(True, alpha=0.3)


def write_comparison(model_dir, comparison):
    os.makedirs(model_dir, exist_ok=True)
    files.write_json(os.path.join(model_dir, "comparison.json"), comparison)
    markdown = format_markdown(comparison)
    files.write_text(os.path.join(model_dir, "comparison.md"), markdown)
    plot_tradeoff(comparison, os.path.join(model_dir, "tradeoff.png"))
    print(markdown)
    names = ("comparison.md", "comparison.json", "tradeoff.png")
    print("written: " + ", ".join(os.path.join(model_dir, name) for name in names))


def _run(run_config, methods, seeds, recipe, recipe_dir, variant_dir):
    from mtard_tf.job import distribute
    if run_config.runtime.strategy != "mirrored":
        # Evaluations run between the students' trainings on the chief alone; other workers would wait in a
        # collective for as long as an AutoAttack takes.
        raise config_lib.ConfigError("reproduce runs with --strategy=mirrored only (train a single method on several "
                                     "workers with mtard_tf.main --strategy=multi_worker)")
    reproduce(run_config, methods, distribute.announce(distribute.make_strategy()), seeds=seeds, recipe=recipe,
              recipe_dir=recipe_dir, variant_dir=variant_dir)


def _checked_config(methods, recipe, recipe_dir, variant_dir):
    """The run's configuration from the flags, its methods' recipes and variants read and checked (entry_settings):
    a bad file is refused before the run's directory is touched."""
    config = config_lib.from_flags(FLAGS)
    entry_settings(config, parse_methods(methods), recipe, recipe_dir, variant_dir)
    return config


def main(argv):
    del argv  # startup.parse_flags refuses positional arguments
    methods = tuple(FLAGS.methods)
    seeds = tuple(int(seed) for seed in FLAGS.seeds) if FLAGS.seeds else None
    recipe, recipe_dir, variant_dir = FLAGS.recipe, FLAGS.recipe_dir, FLAGS.variant_dir
    return startup.run_command(lambda: _checked_config(methods, recipe, recipe_dir, variant_dir),
                               lambda run_config: _run(run_config, methods, seeds, recipe, recipe_dir, variant_dir),
                               verbose=FLAGS["verbosity"].present)


def run():
    define_flags()
    startup.run_app(main)


if __name__ == "__main__":
    run()
