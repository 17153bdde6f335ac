"""Robustness evaluation (the paper's protocol, B-MTARD TPAMI 2024): accuracy under FGSM, PGD-SAT, PGD-TRADES,
CW-inf and AutoAttack.

`evaluate` runs the chosen attacks on the first `num_examples` examples of a dataset, batch by batch, and writes
`report.json` (with each accuracy's 95% Wilson confidence interval), `report.md`, `per_image.npz` (the per-image
robust flags of every attack and the labels, for paired comparisons of models) and (optionally) TensorBoard scalars
into `output_dir`. Every attack works in the L-inf ball of radius `epsilon` and in [0, 1], with the model in
inference mode; randomness comes from stateless RNG seeded by `seed`, so a run repeats. A per-image sanity check
(AutoAttack-robust => robust under every other attack => clean-correct) flags broken attacks and gradient masking.
An image counts as robust under an attack only if it is also classified correctly without attack, as in AutoAttack.

`evaluate_deployed` measures a deployed model (a TFLite interpreter, which has no gradients) beside the float model
it was converted from: PGD-20 and APGD-CE transferred from the float model, Square run against each model directly.

Library code: no flags are read here; the CLI passes plain arguments.
"""

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from mtard_tf import files
from mtard_tf.config import ATTACK_NAMES, AttackConfig, EvalConfig
from mtard_tf.attacks import autoattack, white_box as attacks_lib
from mtard_tf.evaluation import stats
from mtard_tf.methods import losses

DISPLAY_NAMES = {
    "clean": "Clean",
    "fgsm": "FGSM",
    "pgd_sat": "PGD-SAT",
    "pgd_trades": "PGD-TRADES",
    "cw": "CW∞",
    "autoattack": "AutoAttack",
    "apgd_ce": "APGD-CE",
    "square": "Square",
    "worst_case": "Worst case",
}
# Beside report.json: one bool array of per-image robust flags per attack name, and "labels".
PER_IMAGE_FILE = "per_image.npz"

# The paper's attacks. CW-inf starts, like PGD, from a uniform random point of the eps-ball: the common practice of
# the TRADES / RSLAD / MTARD evaluation code (`cw_whitebox` adds U(-eps, eps) noise before its 30 steps of 2/255 on
# the margin).
WHITE_BOX = {
    "fgsm": dict(steps=1, step_size=None, random_start=False, loss="ce"),
    "pgd_sat": dict(steps=20, step_size=2.0 / 255.0, random_start=True, loss="ce"),
    "pgd_trades": dict(steps=20, step_size=0.003, random_start=True, loss="ce"),
    "cw": dict(steps=30, step_size=2.0 / 255.0, random_start=True, loss="cw"),
}
CW_KAPPA = 50.0
# Attacks whose per-image robustness AutoAttack's must imply (the sanity check).
_WEAKER_THAN_AUTOATTACK = ("fgsm", "pgd_sat", "pgd_trades", "cw")
_TOLERANCE = 1e-6  # float rounding allowed on |x_adv - x| <= eps


# ----------------------------------------------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------------------------------------------


def _build_white_box(model, image_shape, *, epsilon, steps, step_size, random_start, loss, jit_compile):
    epsilon = float(epsilon)
    step_size = epsilon if step_size is None else float(step_size)

    @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], tf.float32), tf.TensorSpec([None], tf.int32),
                                  tf.TensorSpec([2], tf.int64)],
                 jit_compile=jit_compile, reduce_retracing=True)
    def run(x, y, seed):
        def objective(x_adv):
            logits = autoattack.logits_of(model, x_adv)
            return (losses.cross_entropy(y, logits) if loss == "ce"
                    else losses.margin_loss(y, logits, kappa=CW_KAPPA))

        if random_start:
            noise = tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)
            start = attacks_lib.uniform_start(x, noise, epsilon)
        else:
            start = x
        if steps == 1 and not random_start and step_size == epsilon:
            return attacks_lib.fgsm(objective, x, epsilon=epsilon)
        return attacks_lib.pgd(objective, x, start, epsilon=epsilon, step_size=step_size, steps=steps)

    return run


_ATTACK_DOC = """{display}: {steps} step(s) of {step}, {start}, {loss} loss, in the L-inf ball of radius `epsilon`.

    Args:
      model: a Keras model (or callable `model(x, training=False)`) mapping images in [0, 1] to logits; run in
        inference mode.
      x: a batch of images, float32 [B, H, W, C] in [0, 1].
      y: their integer labels [B].
      epsilon: the L-inf radius, in [0, 1] pixel units.
      seed: seed of the stateless random start (the same seed gives the same images).
      jit_compile: XLA for the attack loop (one device only).

    Returns:
      The adversarial images, float32 [B, H, W, C] in [0, 1] with |x_adv - x| <= epsilon (no gradient flows
      through them). The attack's tf.function is built once per (model, image shape, epsilon).

    Example:

    >>> x_adv = mtard_tf.{public}(model, images, labels, epsilon=8 / 255)
    >>> accuracy = np.mean(np.argmax(model(x_adv), axis=1) == labels)
    """


def _white_box_attack(name, public):
    config = WHITE_BOX[name]

    def attack(model, x, y, *, epsilon=AttackConfig.epsilon, seed=0, jit_compile=False, **unused):
        x = tf.convert_to_tensor(x, tf.float32)
        y = tf.cast(tf.convert_to_tensor(y), tf.int32)
        image_shape = tuple(x.shape[1:])
        key = ("white_box", name, image_shape, float(epsilon), bool(jit_compile))
        run = autoattack.cached_function(model, key, lambda m: _build_white_box(
            m, image_shape, epsilon=epsilon, jit_compile=jit_compile, **config))
        return run(x, y, tf.constant([int(seed), 0], tf.int64))

    attack.__name__ = attack.__qualname__ = public
    attack.__doc__ = _ATTACK_DOC.format(
        display=DISPLAY_NAMES[name], steps=config["steps"], public=public,
        step="eps" if config["step_size"] is None else round(config["step_size"], 6),
        start="uniform random start" if config["random_start"] else "no random start",
        loss="cross-entropy" if config["loss"] == "ce" else f"margin (CW, kappa {CW_KAPPA:g})")
    return attack


def _clean(model, x, y, **unused):
    """No attack: the images themselves."""
    del model, y
    return tf.convert_to_tensor(x, tf.float32)


def _autoattack(model, x, y, *, epsilon=AttackConfig.epsilon, seed=0, jit_compile=False, progress=None, **options):
    """AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square); `options` may reduce its budgets (tests only)."""
    x_adv, _ = autoattack.autoattack_standard(model, x, y, epsilon=epsilon, seed=seed, progress=progress,
                                              jit_compile=jit_compile, **options)
    return x_adv


# The white-box attacks of the evaluation as functions of a model and a batch (the package's API: mtard_tf.pgd, ...).
fgsm = _white_box_attack("fgsm", "fgsm")
pgd = _white_box_attack("pgd_sat", "pgd")
pgd_trades = _white_box_attack("pgd_trades", "pgd_trades")
cw = _white_box_attack("cw", "cw")

# name -> fn(model, x, y, *, epsilon, seed, jit_compile, **options) -> adversarial images of the batch.
ATTACKS = {
    "clean": _clean,
    "fgsm": fgsm,
    "pgd_sat": pgd,
    "pgd_trades": pgd_trades,
    "cw": cw,
    "autoattack": _autoattack,
}


def parse_attacks(attacks):
    """A comma-separated string or a sequence of names -> a tuple in ATTACK_NAMES order, 'clean' always included."""
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    attacks = [a.lower() for a in attacks]
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {list(ATTACK_NAMES)}")
    chosen = set(attacks) | {"clean"}  # W-Robust needs the clean accuracy
    return tuple(name for name in ATTACK_NAMES if name in chosen)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def take_examples(dataset, num_examples=None):
    """The first `num_examples` (all if None) examples of a dataset of (images, labels), as float32 / int32 numpy.

    Batched datasets (images [B, H, W, C]) are expected; an unbatched one ([H, W, C]) is batched here. Integer
    images (uint8) are scaled to [0, 1].
    """
    image_spec = dataset.element_spec[0]
    if image_spec.shape.rank == 3:
        dataset = dataset.batch(256)
    images, labels, count = [], [], 0
    for x, y in dataset:
        if num_examples is not None and count >= num_examples:
            break
        x, y = np.asarray(x), np.asarray(y).reshape(-1)
        if np.issubdtype(x.dtype, np.integer):
            x = x.astype(np.float32) / 255.0
        if num_examples is not None:
            x, y = x[:num_examples - count], y[:num_examples - count]
        images.append(x.astype(np.float32))
        labels.append(y.astype(np.int32))
        count += len(y)
    if not images:
        raise ValueError("the evaluation dataset is empty")
    return np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def sanity_check(correct, max_examples=10):
    """Per-image implications of a sound evaluation, from {attack: bool[N] correct-under-attack}.

    Checks that every attack's robust images are clean-correct, and that AutoAttack-robust images are robust under
    FGSM, PGD-SAT, PGD-TRADES and CW. Returns {"passed", "violations", "checks": [...]}; each check lists its count and
    the first indices that violate it.
    """
    checks = []

    def check(stronger, weaker):
        bad = np.flatnonzero(correct[stronger] & ~correct[weaker])
        checks.append({"robust_under": stronger, "implies_correct_under": weaker, "violations": int(bad.size),
                       "examples": [int(i) for i in bad[:max_examples]]})

    for name in correct:
        if name != "clean" and "clean" in correct:
            check(name, "clean")
    if "autoattack" in correct:
        for name in _WEAKER_THAN_AUTOATTACK:
            if name in correct:
                check("autoattack", name)
    total = sum(c["violations"] for c in checks)
    return {"passed": total == 0, "violations": total, "checks": checks}


def accuracy_result(flags):
    """{"accuracy", "num_correct", "num_examples", "ci95"} of per-image correctness flags (ci95: the 95% Wilson
    interval)."""
    n, num_correct = len(flags), int(np.sum(flags))
    return {"accuracy": float(num_correct / n), "num_correct": num_correct, "num_examples": n,
            "ci95": list(stats.wilson_interval(num_correct, n))}


def _perturbation(x_adv, x):
    """(max |x_adv - x|, number of values of x_adv outside [0, 1]) of a batch."""
    x_adv = np.asarray(x_adv)
    return float(np.max(np.abs(x_adv - x))), int(np.sum((x_adv < 0.0) | (x_adv > 1.0)))


def _check_perturbation(name, max_perturbation, out_of_range, epsilon):
    """Whether an attack's images stayed in the eps-ball and in [0, 1]; logs an error when they did not."""
    valid = max_perturbation <= epsilon + _TOLERANCE and out_of_range == 0
    if not valid:
        logging.error("%s produced images outside the eps-ball or [0, 1] (max |x_adv - x| = %g, eps = %g, "
                      "%d values outside [0, 1]): its accuracy is not a valid robustness number.",
                      name, max_perturbation, epsilon, out_of_range)
    return valid


def format_accuracy(accuracy, ci95=None):
    """An accuracy in %, with its confidence interval when given: '52.80 [48.4, 57.1]'."""
    text = f"{100 * accuracy:.2f}"
    return text if ci95 is None else f"{text} [{100 * ci95[0]:.1f}, {100 * ci95[1]:.1f}]"


def write_per_image(path, correct, labels):
    """Writes {attack name: bool[N] robust flags, "labels": int[N]} to an .npz file atomically (temporary + rename)."""
    if "labels" in correct:
        raise ValueError("'labels' is reserved for the labels array of per_image.npz")
    with files.atomic_file(path, "wb") as f:
        np.savez(f, labels=np.asarray(labels, dtype=np.int64),
                 **{name: np.asarray(flags, dtype=bool) for name, flags in correct.items()})


def read_per_image(output_dir):
    """({attack name: bool[N] robust flags}, labels int[N]) of the evaluation written into `output_dir`.

    Raises FileNotFoundError (with what to do) when the evaluation predates per-image flags.

    Args:
      output_dir: the `output_dir` of an evaluation.

    Returns:
      ({attack name: bool[N]}, labels int[N]); flags[name][i] is True when image i is robust under the attack.

    Example:

    >>> flags, labels = mtard_tf.read_per_image("eval")
    >>> comparison = mtard_tf.mcnemar_exact(flags["pgd_sat"], other_flags["pgd_sat"])
    """
    path = os.path.join(output_dir, PER_IMAGE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: the evaluation in {output_dir} was written without per-image flags; re-run "
            f"the evaluation (delete {os.path.join(output_dir, 'report.json')} and run the command again, or "
            "--mode=evaluate)")
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    labels = arrays.pop("labels")
    return {name: flags.astype(bool) for name, flags in arrays.items()}, labels


def selection_sentence(selection):
    """One sentence on how a model was selected (a student.json "selection" entry), with the caveat of test-set
    selection."""
    if selection.get("mode") == "last":
        return f"Model: the last epoch's ({selection.get('epoch')}), no selection."
    text = (f"Model selection: {selection['mode']}, epoch {selection.get('epoch')} of the best "
            f"{selection.get('metric_name', 'metric')} = {100 * selection['metric']:.2f}% on "
            f"{selection.get('num_examples')} images of {selection.get('split')}.")
    if selection["mode"] == "best_test":
        text += " Selected on the test split itself: the test figures above are optimistic."
    return text


def format_markdown(report, title=None):
    """The report table: Attack | Accuracy (%) [95% CI] | W-Robust (%) | Time (s)."""
    eps = report["epsilon"]
    lines = [f"# {title or 'Robustness evaluation'}", "",
             f"L∞ ε = {eps * 255:.4g}/255 ({eps:.5f}), inputs in [0, 1], {report['num_examples']} test images "
             f"(the first N), seed {report['seed']}.", "",
             "| Attack | Accuracy (%) | W-Robust (%) | Time (s) |", "|---|---:|---:|---:|"]
    for name, r in report["attacks"].items():
        lines.append(f"| {DISPLAY_NAMES.get(name, name)} | {format_accuracy(r['accuracy'], r.get('ci95'))} "
                     f"| {100 * r['w_robust']:.2f} | {r['seconds']:.1f} |")
    lines.append("")
    lines.append("Accuracy [95% Wilson confidence interval over the test images]. W-Robust = (clean accuracy + "
                 "accuracy under the attack) / 2. AutoAttack = standard version (APGD-CE, APGD-T, FAB-T, Square "
                 "5000 queries), worst case per image. Per-image robust flags: "
                 f"{report.get('per_image', PER_IMAGE_FILE)}.")
    lines += per_class_lines(report.get("per_class"))
    selection = report.get("selection")
    if selection:
        lines += ["", selection_sentence(selection)]
    options = report.get("attack_options", {})
    if options:
        lines.append("")
        lines.append("**Non-standard attack settings** (not comparable with published numbers): "
                     + "; ".join(f"{name}: {opts}" for name, opts in options.items()) + ".")
    sanity = report.get("sanity")
    if sanity is not None:
        lines.append("")
        if sanity["passed"]:
            lines.append("Sanity check passed: per image, AutoAttack-robust ⇒ robust under the other attacks ⇒ "
                         "clean-correct.")
        else:
            lines.append(f"**Sanity check failed: {sanity['violations']} violation(s)** (a broken attack or "
                         "gradient masking):")
            lines.append("")
            for c in sanity["checks"]:
                if c["violations"]:
                    weaker = c["implies_correct_under"]
                    what = "clean-correct" if weaker == "clean" else f"robust under {weaker}"
                    lines.append(f"- {c['violations']} image(s) robust under {c['robust_under']} but not {what} "
                                 f"(e.g. indices {c['examples']})")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def per_class_lines(per_class):
    """report.md's per-class table (lines, a blank one first) of a "per_class" entry (per_class_accuracy); none for
    None."""
    if not per_class:
        return []
    names = list(per_class["accuracy"])
    lines = ["", "| Class | Images | " + " | ".join(f"{DISPLAY_NAMES.get(n, n)} (%)" for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for k, class_name in enumerate(per_class["class_names"]):
        cells = [("–" if per_class["accuracy"][n][k] is None else f"{100 * per_class['accuracy'][n][k]:.2f}")
                 for n in names]
        lines.append(f"| {class_name} | {per_class['num_examples'][k]} | " + " | ".join(cells) + " |")
    return lines


def per_class_accuracy(correct, labels, class_names):
    """{"class_names", "num_examples": images per class, "accuracy": {attack: [accuracy on class k's images, None
    for a class without images]}} of the per-image flags `correct` ({attack: bool[N]})."""
    labels = np.asarray(labels)
    counts = [int((labels == k).sum()) for k in range(len(class_names))]
    accuracy = {name: [float(flags[labels == k].mean()) if counts[k] else None for k in range(len(class_names))]
                for name, flags in correct.items()}
    return {"class_names": [str(c) for c in class_names], "num_examples": counts, "accuracy": accuracy}


def _batch_seed(seed, attack_index, batch_index):
    return int(np.random.SeedSequence([int(seed), attack_index, batch_index]).generate_state(1)[0])


def evaluate(model, dataset, *, attacks=ATTACK_NAMES, epsilon=AttackConfig.epsilon, num_examples=None,
             batch_size=EvalConfig.batch_size, seed=0, output_dir, summary_writer=None, progress=True, step=0,
             jit_compile=False, attack_options=None, title=None, selection=None, model_file=None, class_names=None):
    """Accuracy of `model` under each attack on the first `num_examples` examples of `dataset`.

    Args:
      model: a Keras model (or callable `model(x, training=False)`) mapping images in [0, 1] to logits.
      dataset: tf.data.Dataset of (images float32 [B, H, W, C] in [0, 1], int labels [B]) batches.
      attacks: names from ATTACK_NAMES (or a comma-separated string); 'clean' is always evaluated.
      epsilon: L-inf radius. num_examples: None = all. batch_size: images per attack batch. seed: RNG seed.
      output_dir: where report.json and report.md go (created if needed).
      summary_writer: optional tf.summary writer; scalars eval/<attack>_{accuracy,w_robust,seconds} at `step`.
      progress: show a keras Progbar per attack. jit_compile: XLA for the gradient attacks (one device only; off
        by default: on a CPU XLA made conv-net attack loops slower than oneDNN, docs/performance.md).
      attack_options: {attack name: extra keyword arguments}, e.g. reduced AutoAttack budgets for tests.
      selection: how the evaluated model was selected (the "selection" entry of its student.json), kept in the
        report and stated in report.md.
      model_file: {"path", "sha256"} of the evaluated model's file, kept in the report (a model card quotes the
        report only for the file it evaluated).
      class_names: the dataset's class names (label k is class_names[k]): the report then gives every attack's
        accuracy per class ("per_class", per_class_accuracy) and report.md a table of it.
    Returns:
      The report dict: the content of report.json (per attack its accuracy, num_correct, num_examples, ci95 (the
      95% Wilson interval), w_robust, seconds; the sanity check) and the per-image results that per_image.npz holds:
      "robust_flags" ({attack name: bool[N]}, True where image i is robust under the attack) and "labels" (int[N]).

    Example:

    >>> report = mtard_tf.evaluate(model, test_dataset, attacks=["pgd_sat"], num_examples=200, output_dir="eval")
    >>> pgd = report["attacks"]["pgd_sat"]
    >>> print(f"PGD-20: {pgd['accuracy']:.3f}, 95% CI {pgd['ci95']}")
    >>> broken = np.flatnonzero(report["robust_flags"]["clean"] & ~report["robust_flags"]["pgd_sat"])
    """
    names = parse_attacks(attacks)
    attack_options = dict(attack_options or {})
    epsilon = float(epsilon)
    images, labels = take_examples(dataset, num_examples)
    n = len(labels)
    os.makedirs(output_dir, exist_ok=True)

    results, correct = {}, {}
    for attack_index, name in enumerate(names):
        options = dict(attack_options.get(name, {}))
        if progress:
            print(f"[{attack_index + 1}/{len(names)}] {DISPLAY_NAMES[name]} on {n} images", flush=True)
        bar = keras.utils.Progbar(n, verbose=1 if progress else 0, stateful_metrics=["accuracy"], unit_name="image")
        flags = np.zeros(n, dtype=bool)
        max_perturbation, out_of_range = 0.0, 0
        start = time.time()
        for batch_index, begin in enumerate(range(0, n, batch_size)):
            end = min(begin + batch_size, n)
            x = tf.constant(images[begin:end])
            y = tf.constant(labels[begin:end])
            if name == "autoattack":
                options["progress"] = _autoattack_logger(batch_index, -(-n // batch_size))
            x_adv = ATTACKS[name](model, x, y, epsilon=epsilon, seed=_batch_seed(seed, ATTACK_NAMES.index(name),
                                                                                 batch_index),
                                  jit_compile=jit_compile, **options)
            _, pred = autoattack.predict(model, x_adv)
            flags[begin:end] = pred.numpy() == labels[begin:end]
            if name != "clean":
                # Robust = correct on the clean image and on the attacked one (AutoAttack's convention): the attacker
                # may always submit the clean image, so an attack that happens to "fix" a misclassified image (FGSM
                # on a non-robust model does) must not count as robustness.
                flags[begin:end] &= correct["clean"][begin:end]
            batch_perturbation, batch_out_of_range = _perturbation(x_adv, images[begin:end])
            max_perturbation = max(max_perturbation, batch_perturbation)
            out_of_range += batch_out_of_range
            bar.update(end, values=[("accuracy", float(flags[:end].mean()))])
        seconds = time.time() - start
        correct[name] = flags
        results[name] = {**accuracy_result(flags), "seconds": round(seconds, 3), "max_perturbation": max_perturbation,
                         "valid": _check_perturbation(name, max_perturbation, out_of_range, epsilon)}
        logging.info("%s: accuracy %.2f%% (%d/%d) in %.1f s", DISPLAY_NAMES[name], 100 * flags.mean(),
                     flags.sum(), n, seconds)

    clean_accuracy = results["clean"]["accuracy"]
    for r in results.values():
        r["w_robust"] = (clean_accuracy + r["accuracy"]) / 2.0

    sanity = sanity_check(correct)
    for c in sanity["checks"]:
        if c["violations"]:
            weaker = c["implies_correct_under"]
            logging.warning(
                "Sanity check: %d image(s) robust under %s but %s (indices %s%s). This means a broken attack or "
                "gradient masking.", c["violations"], c["robust_under"],
                "misclassified clean" if weaker == "clean" else f"broken by {weaker}", c["examples"],
                ", ..." if c["violations"] > len(c["examples"]) else "")

    report = {"attacks": results, "epsilon": epsilon, "num_examples": n, "seed": int(seed),
              "batch_size": int(batch_size), "sanity": sanity, "per_image": PER_IMAGE_FILE}
    if selection:
        report["selection"] = selection
    if model_file:
        report["model"] = model_file
    if class_names is not None:
        report["per_class"] = per_class_accuracy(correct, labels, class_names)
    if attack_options:
        report["attack_options"] = {name: {k: v for k, v in opts.items() if not callable(v)}
                                    for name, opts in attack_options.items()}
    write_report(output_dir, report, correct, labels, format_markdown(report, title))

    if summary_writer is not None:
        with summary_writer.as_default():
            for name, r in results.items():
                tf.summary.scalar(f"eval/{name}_accuracy", r["accuracy"], step=step)
                tf.summary.scalar(f"eval/{name}_w_robust", r["w_robust"], step=step)
                tf.summary.scalar(f"eval/{name}_seconds", r["seconds"], step=step)
            tf.summary.scalar("eval/sanity_violations", sanity["violations"], step=step)
        summary_writer.flush()
    return {**report, "robust_flags": correct, "labels": labels}


def write_report(output_dir, report, correct, labels, markdown):
    """per_image.npz (`correct`, `labels`), then report.json (`report`, which names it) and report.md."""
    write_per_image(os.path.join(output_dir, PER_IMAGE_FILE), correct, labels)
    files.write_text(os.path.join(output_dir, "report.json"), json.dumps(report, indent=2) + "\n")
    files.write_text(os.path.join(output_dir, "report.md"), markdown)


def _autoattack_logger(batch_index, num_batches):
    def log(stage, num_robust, num_images):
        logging.info("AutoAttack batch %d/%d: %d/%d robust after %s", batch_index + 1, num_batches, num_robust,
                     num_images, stage)
    return log


# ----------------------------------------------------------------------------------------------------------------
# A deployed model (e.g. TFLite) beside the float model it was converted from
# ----------------------------------------------------------------------------------------------------------------

# Attack -> how it reaches the deployed model: "transfer" (crafted on the float source model with its gradients,
# then given to the deployed model) or "direct" (computed against the deployed model itself). Clean images are
# given to each model directly.
DEPLOYED_ATTACKS = {"clean": "direct", "pgd_sat": "transfer", "apgd_ce": "transfer", "square": "direct"}
# The deployed report's last row: an image counts as robust only if every attack above failed on it (as AutoAttack
# counts its attacks). A quantised model can resist one kind of attack by accident (Square's queries stall on
# quantised logits), so no single row is its robustness.
WORST_CASE = "worst_case"
# Per-image flags of the source model in per_image.npz: "source_<attack>".
SOURCE_PREFIX = "source_"


def _craft(name, model, x, y, *, epsilon, seed, square_queries):
    """The images of attack `name` against `model`: clean, PGD-SAT (20 steps of 2/255), APGD-CE (100 iterations;
    as in AutoAttack, an image it does not break comes back unchanged) or Square (margin loss)."""
    if name == "apgd_ce":
        return autoattack.apgd(model, x, y, epsilon=epsilon, steps=100, loss="ce", seed=seed)
    if name == "square":
        return autoattack.square(model, x, y, epsilon=epsilon, queries=square_queries, seed=seed)
    return ATTACKS[name](model, x, y, epsilon=epsilon, seed=seed)


def evaluate_deployed(deployed, source, dataset, *, epsilon=AttackConfig.epsilon, num_examples=None,
                      batch_size=EvalConfig.batch_size, seed=0, square_queries=EvalConfig.square_queries, output_dir,
                      progress=True, details=None, title=None, class_names=None):
    """Robustness of a deployed model beside the float model it was converted from, on the same images.

    `deployed` is a callable images -> logits without gradients (a tflite.TFLiteModel); `source` the float Keras
    model. Attacks (DEPLOYED_ATTACKS): clean; PGD-20 (pgd_sat) and APGD-CE crafted on `source` and given to both
    models (a transfer attack on `deployed`, white-box on `source`); Square (`square_queries` queries) run against
    each model directly, the deployed one through its logits only. Batch seeds are those of `evaluate` for PGD-SAT
    and AutoAttack, so with the same batch size the source's PGD-20 and APGD-CE images are those of its own
    evaluation. An image counts as robust for a model only if that model also classifies it correctly clean.

    Writes report.json ({"attacks": {name: {"kind", accuracy fields of `deployed`, "seconds", "source": the same
    for `source`}}, ...} plus `details`), report.md and per_image.npz (the deployed model's flags by attack name,
    the source's as "source_<name>") into `output_dir`. With the dataset's `class_names` (label k is
    class_names[k]) the report also gives the deployed model's accuracy per class under every attack and the worst
    case ("per_class", per_class_accuracy), and report.md a table of it. Returns the report.
    """
    epsilon = float(epsilon)
    images, labels = take_examples(dataset, num_examples)
    n = len(labels)
    os.makedirs(output_dir, exist_ok=True)
    models = {"deployed": deployed, "source": source}
    correct = {role: {} for role in models}
    results = {}
    for index, (name, kind) in enumerate(DEPLOYED_ATTACKS.items()):
        seed_index = ATTACK_NAMES.index(name if name in ATTACK_NAMES else "autoattack")
        if progress:
            print(f"[{index + 1}/{len(DEPLOYED_ATTACKS)}] {DISPLAY_NAMES[name]} ({kind}) on {n} images", flush=True)
        bar = keras.utils.Progbar(n, verbose=1 if progress else 0, unit_name="image")
        flags = {role: np.zeros(n, dtype=bool) for role in models}
        seconds = dict.fromkeys(models, 0.0)
        max_perturbation, out_of_range = 0.0, 0
        for batch_index, begin in enumerate(range(0, n, batch_size)):
            end = min(begin + batch_size, n)
            x, y = tf.constant(images[begin:end]), tf.constant(labels[begin:end])
            options = dict(epsilon=epsilon, seed=_batch_seed(seed, seed_index, batch_index),
                           square_queries=square_queries)
            if kind == "transfer":  # crafted once, on the source; its time counts as the source's
                start = time.time()
                transferred = _craft(name, source, x, y, **options)
                seconds["source"] += time.time() - start
            for role, model in models.items():
                start = time.time()
                x_adv = transferred if kind == "transfer" else _craft(name, model, x, y, **options)
                _, pred = autoattack.predict(model, x_adv)
                flags[role][begin:end] = pred.numpy() == labels[begin:end]
                if name != "clean":
                    flags[role][begin:end] &= correct[role]["clean"][begin:end]
                seconds[role] += time.time() - start
                batch_perturbation, batch_out_of_range = _perturbation(x_adv, images[begin:end])
                max_perturbation = max(max_perturbation, batch_perturbation)
                out_of_range += batch_out_of_range
            bar.update(end)
        for role in models:
            correct[role][name] = flags[role]
        results[name] = {"kind": kind, **accuracy_result(flags["deployed"]), "seconds": round(seconds["deployed"], 3),
                         "max_perturbation": max_perturbation,
                         "valid": _check_perturbation(name, max_perturbation, out_of_range, epsilon),
                         "source": {**accuracy_result(flags["source"]), "seconds": round(seconds["source"], 3)}}
        if name == "square":
            results[name]["queries"] = int(square_queries)
        logging.info("%s (%s): deployed %.2f%%, source %.2f%%", DISPLAY_NAMES[name], kind,
                     100 * results[name]["accuracy"], 100 * results[name]["source"]["accuracy"])
    for role in models:
        correct[role][WORST_CASE] = np.logical_and.reduce([correct[role][name] for name in DEPLOYED_ATTACKS])
    results[WORST_CASE] = {"kind": "per image", **accuracy_result(correct["deployed"][WORST_CASE]),
                           "seconds": sum(result["seconds"] for result in results.values()),
                           "source": {**accuracy_result(correct["source"][WORST_CASE]),
                                      "seconds": sum(result["source"]["seconds"] for result in results.values())}}
    clean, source_clean = results["clean"]["accuracy"], results["clean"]["source"]["accuracy"]
    for result in results.values():
        result["w_robust"] = (clean + result["accuracy"]) / 2.0
        result["source"]["w_robust"] = (source_clean + result["source"]["accuracy"]) / 2.0

    report = {"attacks": results, "epsilon": epsilon, "num_examples": n, "seed": int(seed),
              "batch_size": int(batch_size), "per_image": PER_IMAGE_FILE, **(details or {})}
    if class_names is not None:
        report["per_class"] = per_class_accuracy(correct["deployed"], labels, class_names)
    per_image = {**correct["deployed"], **{SOURCE_PREFIX + name: f for name, f in correct["source"].items()}}
    write_report(output_dir, report, per_image, labels, format_deployed_markdown(report, title))
    return report


def format_deployed_markdown(report, title=None):
    """The table of `evaluate_deployed`: Attack | Kind | Deployed (%) [95% CI] | Float source (%) [95% CI] | Time."""
    eps = report["epsilon"]
    lines = [f"# {title or 'Robustness of the deployed model'}", "",
             f"L∞ ε = {eps * 255:.4g}/255 ({eps:.5f}), inputs in [0, 1], {report['num_examples']} test images "
             f"(the first N), seed {report['seed']}.", ""]
    deployed, source = report.get("deployed"), report.get("source")
    if deployed:
        text = f"Deployed: `{deployed['path']}`"
        if deployed.get("quantization"):
            quantization = deployed["quantization"]
            text += f", {deployed['format']} " + ("float32" if quantization == "none" else quantization)
        if deployed.get("bytes"):
            text += f", {deployed['bytes']} bytes"
        if deployed.get("latency_ms") is not None:
            runtime = f"{deployed['runtime']}, " if deployed.get("runtime") else ""
            text += (f", {deployed['latency_ms']:.3f} ms per image ({runtime}median over {deployed['latency_images']} "
                     f"images, batch 1, {deployed['threads']} threads)")
        lines += [text + ".", ""]
    if source:
        lines += [f"Float source model: `{source['path']}`.", ""]
    lines += ["| Attack | Kind | Deployed (%) | Float source (%) | Time deployed / source (s) |",
              "|---|---|---:|---:|---:|"]
    for name, r in report["attacks"].items():
        display = DISPLAY_NAMES.get(name, name) + (f" ({r['queries']} queries)" if "queries" in r else "")
        lines.append(f"| {display} | {r['kind']} | {format_accuracy(r['accuracy'], r.get('ci95'))} "
                     f"| {format_accuracy(r['source']['accuracy'], r['source'].get('ci95'))} "
                     f"| {r['seconds']:.1f} / {r['source']['seconds']:.1f} |")
    lines += ["", "Accuracy [95% Wilson confidence interval over the test images]. transfer: adversarial images "
              "crafted on the float source model with its gradients (white-box for it), then given to the deployed "
              "model; direct: run against each model itself (Square needs only the logits). PGD-SAT = PGD-20, "
              "20 steps of 2/255 from a uniform random start; APGD-CE: 100 iterations (images it does not break "
              "on the source come back unchanged, as in AutoAttack). An image counts as robust only if the same "
              "model also classifies it correctly clean. Worst case: robust to every attack above (per image); "
              "the deployed model's robustness is this row, not its best one. Per-image robust flags: "
              f"{report.get('per_image', PER_IMAGE_FILE)} (the source's as {SOURCE_PREFIX}<attack>)."]
    lines += per_class_lines(report.get("per_class"))
    return "\n".join(lines) + "\n"
