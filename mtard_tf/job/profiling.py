"""Profiler traces of a training step for TensorBoard's Profile tab (--profile_dir), and the time per TensorFlow op
type in a trace, read without the profile plugin.

A trace is `<logdir>/plugins/profile/<time>/<host>.xplane.pb`, where `tensorboard --logdir=<logdir>` finds it (the
Profile tab needs `pip install tensorboard-plugin-profile`; `op_seconds` needs nothing beyond TensorFlow).
"""

import collections
import contextlib
import glob
import os

import keras
import tensorflow as tf


@contextlib.contextmanager
def trace(logdir):
    """Traces everything TensorFlow runs inside the block into `logdir`."""
    tf.profiler.experimental.start(logdir)
    try:
        yield
    finally:
        tf.profiler.experimental.stop()


def trace_files(logdir):
    """The trace files under `logdir`, oldest first."""
    return sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))


class ProfileStep(keras.callbacks.Callback):
    """Traces the `step`-th training step (1-based) of the fits this callback serves into `logdir`. The first step
    also traces and compiles the step function, so the default, 2, is the first step that runs as all later ones do.
    """

    def __init__(self, logdir, step=2):
        super().__init__()
        self.logdir = logdir
        self.step = int(step)
        self.steps_seen = 0
        self.tracing = False

    def on_train_batch_begin(self, batch, logs=None):
        self.steps_seen += 1
        if self.steps_seen == self.step:
            tf.profiler.experimental.start(self.logdir)
            self.tracing = True

    def on_train_batch_end(self, batch, logs=None):
        # Overriding this method makes Keras hand over the logs as Python numbers: the step has finished.
        self._stop()

    def on_train_end(self, logs=None):
        self._stop()

    def _stop(self):
        if self.tracing:
            tf.profiler.experimental.stop()
            self.tracing = False


STEP_PARTS = ("attack", "teachers", "student_update")  # the name scopes of Distiller.train_step


def part_of(op_name, op_type):
    """The part of the step (STEP_PARTS) an op of a profiler trace belongs to, by its name scope; "other" outside
    them. A key for op_seconds."""
    scopes = op_name.split("/")
    return next((part for part in STEP_PARTS if part in scopes), "other")


def op_seconds(path, key=lambda op_name, op_type: op_type):
    """{key(op name, op type): seconds}, by default {op type: seconds}, of the TensorFlow ops in the trace file
    `path`, most first: each op's own time (time spent in ops it contains subtracted), summed over the host's threads.
    Ops that run concurrently on several threads are all counted, so the total can exceed the wall time."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            events = []
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # An op's event is named "<op name>:<op type>"; the runtime's own are "Class::method" or
                # "EagerLocalExecute: <function or op>" (the Python thread waiting for the graph's ops).
                op_name, _, op_type = name.rpartition(":")
                if op_name and not op_name.endswith(":") and op_type.isidentifier():
                    events.append((event.offset_ps, event.offset_ps + event.duration_ps, key(op_name, op_type)))
            events.sort(key=lambda e: (e[0], -e[1]))
            enclosing = []  # (end, group) of the ops that contain the current one
            for start, end, group in events:
                while enclosing and enclosing[-1][0] <= start:
                    enclosing.pop()
                if enclosing:
                    totals[enclosing[-1][1]] -= (end - start) / 1e12
                totals[group] += (end - start) / 1e12
                enclosing.append((end, group))
    return dict(totals.most_common())
