"""Interruption-safe training: step checkpoints of everything a run needs to continue exactly, and a guard that
stops on a non-finite loss without overwriting the last good checkpoint.

A checkpoint holds the trained model, the optimizer (step counter, momentum) and the trainer's own state variables
(the balancing state tau_a, tau_n, w_adv, w_nat, L(0) of B-MTARD). The data position is the optimizer step: the
training stream of data.train_dataset is a function of (seed, step), and the validation attack's noise is a function
of (seed, step, batch), so a validation advances nothing that needs saving. TensorFlow writes
checkpoint files under temporary names and updates the `checkpoint` index atomically, so a crash while saving leaves
the previous checkpoint usable.
"""

import json
import math
import os
import signal
import time

import keras
import tensorflow as tf

from mtard_tf import files
from mtard_tf.errors import UserError

# Beside the checkpoints: {step: training wall time up to that checkpoint}, so that a resumed run's training time
# counts every sitting (a JSON file rather than a checkpoint variable, so checkpoints written before it still load).
TRAIN_SECONDS_FILE = "train_seconds.json"


class CheckpointMismatchError(UserError, ValueError):
    """The run's directory holds checkpoints of another run (another architecture or method)."""


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN or infinite loss."""


def trainer_checkpoint(trainer):
    """tf.train.Checkpoint of the trained model, the optimizer and the trainer's non-trainable state."""
    return tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer, state=trainer.state_variables())


class StepCheckpoints:
    """Keeps the last `max_to_keep` checkpoints of a trainer in `directory`, numbered by optimizer step.

    `write_directory` (default `directory`) is where this process saves: a non-chief worker of a multi-worker run
    saves into its own scratch directory and restores, like every worker, from the chief's `directory`.
    """

    def __init__(self, trainer, directory, write_directory=None, max_to_keep=2):
        self.trainer = trainer
        self.directory = directory
        self.write_directory = write_directory or directory
        self.max_to_keep = max_to_keep
        self.checkpoint = trainer_checkpoint(trainer)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.write_directory, max_to_keep=max_to_keep)
        self.started = time.time()
        self.seconds_before = 0.0  # training time of the earlier sittings, up to the restored checkpoint

    def train_seconds(self):
        """Training wall time so far: this sitting's (since this object was made) and the earlier sittings' up to the
        restored checkpoint (the time after a sitting's last checkpoint is lost with its work, and redone)."""
        return self.seconds_before + time.time() - self.started

    def _recorded_seconds(self):
        path = os.path.join(self.directory, TRAIN_SECONDS_FILE)
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def latest(self):
        """The newest checkpoint in `directory` (None without one)."""
        return tf.train.latest_checkpoint(self.directory)

    def step(self):
        return int(self.trainer.optimizer.iterations.numpy())

    def save(self):
        """Saves at the current step unless that step is saved already; returns the path."""
        step = self.step()
        if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(f"-{step}"):
            return self.manager.latest_checkpoint
        # The checkpoints the manager keeps after this save: the newest max_to_keep - 1 of today's, and this one.
        kept = [path.rsplit("-", 1)[1] for path in self.manager.checkpoints][1 - self.max_to_keep:] \
            if self.max_to_keep > 1 and self.write_directory == self.directory else []
        recorded = {key: value for key, value in self._recorded_seconds().items() if key in kept}
        recorded[str(step)] = round(self.train_seconds(), 1)
        files.write_json(os.path.join(self.write_directory, TRAIN_SECONDS_FILE), recorded)
        return self.manager.save(checkpoint_number=step)

    def restore_latest(self):
        """Restores the newest checkpoint, if any; returns the step it was taken at (0 without one)."""
        latest = self.latest()
        if latest is None:
            return 0
        try:
            with self.trainer.distribute_strategy.scope():
                if not self.trainer.optimizer.built:
                    self.trainer.optimizer.build(self.trainer.model.trainable_variables)
                self.checkpoint.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise CheckpointMismatchError(f"checkpoint {latest} does not fit this run (another architecture or method?): use "
                             f"another --model_dir or delete {self.directory}. Details: "
                             f"{str(error).splitlines()[0]}") from error
        self.seconds_before = float(self._recorded_seconds().get(str(self.step()), 0.0))
        self.started = time.time()
        return self.step()


# Test-only: `<point>:<number>` in this environment variable makes the process SIGKILL itself at that point, so a
# test interrupts a run exactly where it wants (never racing a timer): `step_checkpoint:S` right after the step-S
# checkpoint, `validated:E` after epoch E's validation and before its checkpoint, `epoch_checkpoint:E` right after it.
KILL_POINT_VARIABLE = "MTARD_TF_TEST_KILL_AT"


def kill_point(name, number):
    """SIGKILLs this process when KILL_POINT_VARIABLE names this point (test-only; a no-op otherwise)."""
    if os.environ.get(KILL_POINT_VARIABLE) == f"{name}:{number}":
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointCallback(keras.callbacks.Callback):
    """Saves every `every_n_steps` optimizer steps (if > 0) and at the end of every epoch (after its validation)."""

    def __init__(self, checkpoints, every_n_steps=0):
        super().__init__()
        self.checkpoints = checkpoints
        self.every_n_steps = int(every_n_steps or 0)

    def on_train_batch_end(self, batch, logs=None):
        step = self.checkpoints.step()
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.checkpoints.save()
            kill_point("step_checkpoint", step)

    def on_epoch_end(self, epoch, logs=None):
        kill_point("validated", epoch + 1)
        self.checkpoints.save()
        kill_point("epoch_checkpoint", epoch + 1)


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Raises NonFiniteLossError at the first step whose loss is NaN or infinite.

    Raising (rather than keras.callbacks.TerminateOnNaN's stop_training) ends fit before any epoch-end callback
    could checkpoint the broken weights, so the last checkpoint stays the last good one. Keep it first in the list.
    """

    def __init__(self, checkpoint_directory):
        super().__init__()
        self.checkpoint_directory = checkpoint_directory

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            step = int(self.model.optimizer.iterations.numpy())
            raise NonFiniteLossError(
                f"the training loss became {loss} at step {step}; training stopped. The last good checkpoint is in "
                f"{self.checkpoint_directory} (lower --learning_rate or check the data and teachers, then re-run)")
