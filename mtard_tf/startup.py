"""The start of every command: TensorFlow imported and its devices found without its native start-up log, so the
first line a user reads is the program's own.

TensorFlow's native libraries write to the process's stderr while they load and while the devices are probed
(oneDNN, the CUDA probe, "All log messages before absl::InitializeLog() is called ..."). absl prints these before
its logging is initialised, so TF_CPP_MIN_LOG_LEVEL does not turn them off. `start_tensorflow` holds them back
(file descriptor 2 points at a temporary file meanwhile) and shows them only if the start fails or `verbose` asks.
"""

import contextlib
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's later C++ info/warnings; errors still show


@contextlib.contextmanager
def held_back_stderr(show=False):
    """What native code and Python write to stderr inside the block is dropped, or replayed if the block raises."""
    if show:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def start_tensorflow(verbose=False):
    """Imports TensorFlow and lists the physical devices (logical devices can still be configured afterwards);
    unless `verbose`, quietly, and with TensorFlow's Python logger and AutoGraph limited to errors."""
    with held_back_stderr(show=verbose):
        import tensorflow as tf
        tf.config.list_physical_devices()
    if not verbose:
        tf.get_logger().setLevel("ERROR")
        tf.autograph.set_verbosity(0)
    return tf
