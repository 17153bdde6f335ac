"""The balancing dynamics of a distillation run, drawn from its TensorBoard logs.

    python -m mtard_tf.evaluation.plot --model_dir=DIR [--output=FILE]

reads the per-step scalars under `DIR/tensorboard` and writes `DIR/balance.png` (or FILE): four panels over the
training step, "adv" being the robust teacher on the adversarial input x' and "nat" the clean teacher on x.

1. Teacher temperatures tau_adv, tau_nat. Entropy-Based Balance (Zhao et al., B-MTARD, TPAMI 2024) heats the
   sharper teacher, the one of lower entropy: its temperature rises (and the other's falls) by a fixed rate each step
   until the two entropies meet, after which the temperatures hover around the values that keep them together.
2. Loss weights w_adv, w_nat (w_adv + w_nat = 1). Normalization Loss Balance (same paper) moves the weight toward the
   teacher whose distillation loss has fallen less relative to its first-step value (the larger L / L(0)), so the
   student spends more effort on the teacher it is learning from more slowly.
3. The two distillation losses KL_adv, KL_nat, whose relative progress drives panel 2.
4. The teachers' entropies as logged: E = mean over classes of p * log p, which is <= 0 (minus the entropy / C).
   The sharper teacher is the curve nearer 0; when the curves meet, panel 1's temperatures stop drifting apart.

A SAT / TRADES / ARD-style student logs none of these tags; the command then says so and exits 1.
"""

import os
import sys

from absl import flags, logging

from mtard_tf import config, files
from mtard_tf.errors import UserError
from mtard_tf.job import startup

FLAGS = flags.FLAGS


class LogsNotFoundError(UserError, FileNotFoundError):
    """No TensorBoard logs where a run's should be."""


class NoBalancingTagsError(UserError, ValueError):
    """TensorBoard logs of a run that has no balancing state (not a B-MTARD / MTARD distillation)."""


# The distiller's balancing tags (what Distiller.train_step logs besides loss and learning_rate), panel by panel.
PANELS = (
    ("Teacher temperatures (Entropy-Based Balance)", "temperature τ", ("temperature_adv", "temperature_nat"),
     ("τ_adv (robust teacher)", "τ_nat (clean teacher)")),
    ("Loss weights (Normalization Loss Balance)", "weight w", ("weight_adv", "weight_nat"),
     ("w_adv (robust teacher)", "w_nat (clean teacher)")),
    ("Distillation losses", "KL divergence", ("kl_adv", "kl_nat"),
     ("KL_adv (to robust teacher, on x′)", "KL_nat (to clean teacher, on x)")),
    ("Teacher entropies (nearer 0 = sharper teacher)", "mean p·log p  (≤ 0)", ("entropy_adv", "entropy_nat"),
     ("entropy_adv (robust teacher)", "entropy_nat (clean teacher)")),
)
BALANCE_TAGS = tuple(tag for _, _, tags, _ in PANELS for tag in tags)
COLORS = ("tab:red", "tab:blue")  # adv, nat


def read_step_scalars(log_dir):
    """{tag: (steps, values)} of every scalar in the event files under `log_dir`, as float64 numpy arrays.

    Both TF2 tensor summaries (tf.summary.scalar, as mtard_tf.job.summaries writes them) and TF1 scalar summaries are
    read; non-scalar tensors (histograms, images) are skipped. A step logged more than once (a resumed run re-logs
    the steps it redid) keeps the value written last (latest wall time, then reading order); steps are sorted.
    Raises LogsNotFoundError if `log_dir` is not a directory.
    """
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    if not os.path.isdir(log_dir):
        raise LogsNotFoundError(f"no TensorBoard log directory {log_dir}")
    # Keep everything (no reservoir sampling) and do not let the accumulator drop re-logged steps: that is done
    # here, by wall time.
    events = EventAccumulator(log_dir, size_guidance={"tensors": 0, "scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    tags = events.Tags()
    records = {}  # tag -> [(step, wall_time, order, value)]
    for tag in tags.get("scalars", []):
        records.setdefault(tag, []).extend(
            (e.step, e.wall_time, i, float(e.value)) for i, e in enumerate(events.Scalars(tag)))
    for tag in tags.get("tensors", []):
        rows = []
        for i, e in enumerate(events.Tensors(tag)):
            value = tensor_util.make_ndarray(e.tensor_proto)
            if value.size != 1 or not np.issubdtype(value.dtype, np.number):
                break
            rows.append((e.step, e.wall_time, i, float(value.reshape(()))))
        else:
            records.setdefault(tag, []).extend(rows)
    result = {}
    for tag, rows in records.items():
        last = {}
        for step, wall_time, order, value in rows:
            if step not in last or (wall_time, order) >= last[step][0]:
                last[step] = ((wall_time, order), value)
        steps = np.array(sorted(last), dtype=np.int64)
        result[tag] = (steps, np.array([last[s][1] for s in steps], dtype=np.float64))
    return result


def plot_balance(model_dir, path=None):
    """Draws the balancing dynamics of the run in `model_dir` (read from `<model_dir>/tensorboard`) to `path`
    (default `<model_dir>/balance.png`) as a ~1000 x 1000 px PNG, written atomically. Returns the path.

    Raises LogsNotFoundError if there is no `<model_dir>/tensorboard`, NoBalancingTagsError if it logs none of the
    balancing tags (a student trained without the two teachers). Tags missing from a partial log leave their curves out.
    """
    log_dir = os.path.join(model_dir, "tensorboard")
    if not os.path.isdir(log_dir):
        raise LogsNotFoundError(f"no TensorBoard logs: {log_dir} does not exist (is {model_dir} a run's model_dir?)")
    scalars = read_step_scalars(log_dir)
    present = [tag for tag in BALANCE_TAGS if tag in scalars and len(scalars[tag][0])]
    if not present:
        found = ", ".join(sorted(scalars)) or "none"
        raise NoBalancingTagsError(f"{log_dir} has none of the balancing tags {', '.join(BALANCE_TAGS)} (tags found: {found}); "
                         "only a B-MTARD / MTARD distillation run logs them")
    path = path or os.path.join(model_dir, "balance.png")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(PANELS), 1, figsize=(10, 10), dpi=100, sharex=True)
    for ax, (title, ylabel, tags, labels) in zip(axes, PANELS):
        drawn = []
        for tag, label, color in zip(tags, labels, COLORS):
            if tag in present:
                steps, values = scalars[tag]
                marker = "o" if len(steps) < 30 else None
                ax.plot(steps, values, color=color, label=label, linewidth=1.4, marker=marker, markersize=3)
                drawn.append(values)
            else:
                ax.plot([], [], color=color, linestyle=":", label=f"{label}: not logged")
        if tags[0].startswith("kl_") and drawn:
            positive = [v[v > 0] for v in drawn]
            low = min((v.min() for v in positive if v.size), default=0)
            if all(v.size == d.size for v, d in zip(positive, drawn)) and low > 0 and max(
                    v.max() for v in positive) / low > 100:
                ax.set_yscale("log")
                ylabel += " (log scale)"
        ax.set_title(title, fontsize=12, loc="left")
        ax.set_ylabel(ylabel, fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=10)
        ax.legend(loc="best", fontsize=9, framealpha=0.8)
    axes[-1].set_xlabel("training step", fontsize=11)
    run_name = os.path.join(*os.path.abspath(model_dir).split(os.sep)[-2:])  # e.g. b_mtard/seed0
    figure.suptitle(f"Teacher balancing dynamics: {run_name}", fontsize=13)
    return files.save_figure(figure, path)


def define_flags(flag_values=FLAGS):
    """The configuration's --model_dir (config.define_flags; required here) and the command's own --output (called
    by run())."""
    config.define_flags(flag_values, names=("model_dir",))
    if "output" not in flag_values:
        flags.DEFINE_string("output", None, "Where to write the PNG (default <model_dir>/balance.png).",
                            flag_values=flag_values)


def main(argv):
    del argv  # startup.run_app refuses positional arguments
    if not FLAGS["model_dir"].present or not FLAGS.model_dir:
        sys.exit("error: --model_dir is required")
    verbose = FLAGS["verbosity"].present
    if not verbose:
        logging.set_verbosity(logging.WARNING)  # TensorBoard's reader logs every file it opens at INFO
    startup.start_tensorflow(verbose)  # TensorBoard's reader loads TensorFlow when installed
    print(plot_balance(FLAGS.model_dir, FLAGS.output))  # a UserError is one line (startup.run_app)


def run():
    define_flags()
    startup.run_app(main)


if __name__ == "__main__":
    run()
