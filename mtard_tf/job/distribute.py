"""Distribution: the tf.distribute strategy of a run, and chief/worker handling of a multi-worker run."""

import atexit
import os
import shutil
import tempfile

import tensorflow as tf

from mtard_tf.config import STRATEGIES

def set_cpu_replicas(num_replicas):
    """Splits the CPU into `num_replicas` logical devices; must run before TensorFlow initialises its devices."""
    if num_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_replicas)])


def make_strategy(kind="mirrored"):
    """mirrored: MirroredStrategy over every visible GPU, else over every logical CPU device.

    multi_worker: MultiWorkerMirroredStrategy over the workers listed in the TF_CONFIG environment variable (each
    worker's GPUs, or its CPU). Must be created before any other TensorFlow operation runs.
    """
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind != "mirrored":
        raise ValueError(f"unknown strategy '{kind}', expected one of {', '.join(STRATEGIES)}")
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def is_chief(strategy):
    """True unless this process is a non-chief worker of a multi-worker run (TF_CONFIG's "chief", else worker 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver else {}
    if not cluster:
        return True
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


_scratch = {}


def writable_dir(strategy, directory):
    """Where this process writes the files of `directory`: `directory` itself on the chief; on another worker a
    private scratch directory, removed at exit.

    Every worker takes part in saving checkpoints and models (reading distributed variables may run collectives),
    but only the chief's files are kept; all workers read the chief's (`directory` must be on storage that every
    worker sees, as TensorFlow's multi-worker checkpointing requires).
    """
    if is_chief(strategy):
        return directory
    if "root" not in _scratch:
        _scratch["root"] = tempfile.mkdtemp(prefix=f"mtard_tf-worker{strategy.cluster_resolver.task_id}-")
        atexit.register(shutil.rmtree, _scratch["root"], ignore_errors=True)
    return os.path.join(_scratch["root"], os.path.abspath(directory).lstrip(os.sep))


def barrier(strategy):
    """Waits until every worker reaches this point (a cross-worker sum), e.g. until the chief's file is written."""
    strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)


def announce(strategy):
    """One line naming the strategy, its replicas and this process's devices."""
    devices = ", ".join(strategy.extended.worker_devices)
    print(f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} replica(s) in all; this process: {devices}"
          f"{'' if is_chief(strategy) else ' (non-chief worker)'}")
    return strategy


def use_xla(strategy, requested="auto"):
    """XLA for the train step: "true" / "false" as requested; "auto": on for a single GPU replica only.

    XLA fails under MirroredStrategy with several replicas ("resource ... located in device CPU:1 from device
    CPU:0"), and on a CPU it made the B-MTARD step several times slower (`python -m mtard_tf.tools.benchmark`; the
    figures are in docs/performance.md).
    """
    if requested != "auto":
        return requested == "true"
    return strategy.num_replicas_in_sync == 1 and has_accelerator()


def has_accelerator():
    """Whether a GPU computes (else the CPU does)."""
    return bool(tf.config.list_logical_devices("GPU"))


def native_bfloat16():
    """(True if every device that will compute has native bfloat16, the reason): NVIDIA GPUs of compute capability
    8.0 or newer (Ampere), else the CPU's avx512_bf16 or amx_bf16 flag (Linux /proc/cpuinfo)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capabilities = [tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
                        for gpu in gpus]
        text = ", ".join(f"{major}.{minor}" for major, minor in capabilities)
        return all(tuple(c) >= (8, 0) for c in capabilities), f"GPU compute capability {text}"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        cpu_flags = set()
    found = sorted(cpu_flags & {"avx512_bf16", "amx_bf16"})
    return bool(found), "CPU with " + ", ".join(found) if found else "CPU without avx512_bf16 / amx_bf16"


def resolve_precision(requested):
    """(the Keras dtype policy to train with, why): `requested` itself, or for "auto" mixed_bfloat16 where the
    device computes bfloat16 natively, else float32."""
    if requested != "auto":
        return requested, "as requested"
    native, reason = native_bfloat16()
    return ("mixed_bfloat16" if native else "float32"), f"auto: {reason}"
