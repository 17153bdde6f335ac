"""The start of every command: TensorFlow imported and its devices found without its native start-up log, so the
first line a user reads is the program's own; and the common frame of the training commands (run_command).

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


def parse_flags(argv):
    """absl's flag parsing with an error as one `error:` line and exit status 1 (absl prints a FATAL line and a
    hint): an unknown or misspelled flag (also in a --flagfile), a flagfile that cannot be read, a bad value, or a
    positional argument (no command takes one)."""
    from absl import flags
    try:
        argv = flags.FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)", file=sys.stderr)
        sys.exit(1)
    return argv


def run_app(main):
    """absl.app.run(main) with parse_flags, and a UserError that main raises as one `error:` line and exit status 1
    (anything else is a defect and keeps its traceback): every command's entry point."""
    from absl import app

    from mtard_tf.errors import UserError

    def guarded(argv):
        try:
            return main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    app.run(guarded, flags_parser=parse_flags)


def make_deterministic(tf):
    """Bit-identical runs: TensorFlow's op determinism (deterministic kernels, tf.data in order, an error for an op
    without a deterministic kernel) and one thread per op, one op at a time. Op determinism alone was not enough on
    the CPU: the multi-threaded oneDNN and Eigen kernels sum partial results in an order that varies from run to run
    (two TRADES teacher runs of the small preset differed after 16 steps, with oneDNN on or off; with one thread they
    were identical), so the threads go too, at the cost the docs give."""
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    print("deterministic: TensorFlow's op determinism is on, with one thread per op and one op at a time")


@contextlib.contextmanager
def _writing_to(model_dir):
    from mtard_tf.errors import UserError
    try:
        yield
    except OSError as error:
        raise UserError(f"cannot write to --model_dir={model_dir}: {error.strerror or error}") from error


def run_command(make_config, body, verbose=False, dry_run=False, trains=True):
    """The common frame of a training command: config = make_config() (the entry point's flags), printed alone with
    `dry_run`; else TensorFlow started quietly, the CPU split into `config.runtime.cpu_replicas` devices, the dtype
    policy set (before any model is built; what `auto` chose is said when the command `trains`), the dataset
    prepared and the image counts checked against its splits, the configuration written to
    `<model_dir>/config.json`, then body(config). A UserError is one `error:` line and exit status 1; anything else is a defect and
    keeps its traceback. Returns the exit status."""
    from absl import logging

    from mtard_tf import files
    from mtard_tf.errors import UserError

    try:
        config = make_config()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if dry_run:
        print(config.to_json())
        return 0
    if not verbose:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (tfds) drown the progress bar
    tf = start_tensorflow(verbose)
    if config.runtime.deterministic:
        make_deterministic(tf)
    import keras

    from mtard_tf import config as config_lib
    from mtard_tf.data import datasets
    from mtard_tf.job import distribute
    distribute.set_cpu_replicas(config.runtime.cpu_replicas)
    precision, reason = distribute.resolve_precision(config.runtime.precision)
    if precision != config.runtime.precision:
        if trains:  # evaluation and export compute in float32 whatever this says
            print(f"precision: {precision} ({reason})")
        config = config_lib.replace(config, precision=precision)  # config.json records what the run used
    keras.mixed_precision.set_global_policy(precision)
    try:
        model_dir = config.runtime.model_dir
        if os.path.exists(model_dir) and not os.path.isdir(model_dir):
            raise UserError(f"--model_dir={model_dir} is a file, not a directory")
        with _writing_to(model_dir):
            os.makedirs(model_dir, exist_ok=True)  # before the data: not a download of minutes, then this error
        datasets.prepare(config.data.source, config.data.data_dir, config.data.download, config.data.manual_dir)
        info = datasets.load_info(config.data.source, config.data.data_dir)
        config_lib.check_split_sizes(config, info.num_train, info.num_test, info.test_split)
        with _writing_to(model_dir):  # after the checks: a refused run leaves the last run's config.json
            files.write_text(os.path.join(model_dir, "config.json"), config.to_json() + "\n")
        body(config)
    except UserError as error:
        logging.debug("error", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
