"""How long a job will take on this machine: each training stage's estimate from its first timed steps, and the plan
of `--mode=all`'s stages.

An estimate is (steps left) x (mean seconds of a measured step), the step times measured after the first step of the
process's fit (which traces and compiles the step function). It counts training steps only: the end-of-epoch
validation and selection evaluations come on top.
"""

import time

import keras

DAY_SECONDS = 24 * 3600
SMALL_PRESET = "flags/cpu_small.cfg"


def format_duration(seconds):
    """'42 s', '12.5 min', '3.2 h' or '95.0 days'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < DAY_SECONDS:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / DAY_SECONDS:.1f} days"


def too_long_warning(seconds, accelerator):
    """The one-line warning for a CPU-only job longer than a day, or None."""
    if accelerator or seconds <= DAY_SECONDS:
        return None
    return (f"warning: about {format_duration(seconds)} on this machine's CPU, which has no accelerator; "
            f"--flagfile={SMALL_PRESET} gives a small job that runs on a 2-core CPU in under an hour")


class WallTimeEstimate(keras.callbacks.Callback):
    """Prints, once, the estimated wall time of the rest of a training stage after `timed_steps` measured steps.

    Args:
      stage: what is trained, as the line names it (e.g. "student (b_mtard)", "robust teacher").
      first_step: the global step the fit starts at (a resumed run starts past 0).
      total_steps: the stage's steps in all (epochs x steps per epoch).
      accelerator: whether a GPU computes; without one an estimate over a day adds too_long_warning's line.
      timed_steps: steps measured, after the first one of this process (tracing), before the estimate.
      clock: a function returning seconds (time.perf_counter; tests give their own).
    """

    def __init__(self, stage, first_step, total_steps, accelerator, timed_steps=5, clock=time.perf_counter):
        super().__init__()
        self.stage, self.step, self.total_steps = stage, first_step, total_steps
        self.accelerator, self.timed_steps, self.clock = accelerator, timed_steps, clock
        self.seen, self.durations, self.started = 0, [], None
        self.estimate = None  # seconds, once printed

    def on_train_batch_begin(self, batch, logs=None):
        self.started = self.clock()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        self.seen += 1
        if self.estimate is not None or self.seen == 1:  # the first step traces and compiles
            return
        self.durations.append(self.clock() - self.started)
        if len(self.durations) == self.timed_steps:
            per_step = sum(self.durations) / len(self.durations)
            left = self.total_steps - self.step
            self.estimate = left * per_step
            lines = [f"\n{self.stage}: {left} steps left x {per_step:.3g} s per step (measured over "
                     f"{len(self.durations)} steps) = about {format_duration(self.estimate)} of training here"]
            warning = too_long_warning(self.estimate, self.accelerator)
            if warning:
                lines.append(warning)
            print("\n".join(lines), flush=True)


def plan_lines(stages):
    """The plan of a multi-stage job: `stages` is a list of (name, what it does) pairs."""
    return ["plan:"] + [f"  {index}. {name}: {what}" for index, (name, what) in enumerate(stages, 1)]
