"""Throughput of the B-MTARD train step: python -m mtard_tf.tools.benchmark [flags].

A configuration is a (--jit_compile, --precision) pair. For each, prints one JSON line with images/s, ms per step, the
split of a step into attack / teachers / student update (each part timed alone as its own tf.function), the FLOPs of one
step and the achieved FLOP/s, the FLOP/s of a large matmul in the compute dtype of --precision (and in float32) on the
same device measured in the same run, so `matmul_fraction` says how much of the machine's attainable rate at that
precision the step reaches, and the process's peak memory so far (`peak_rss_mb`, PyTorch's included with
--compare_torch; and `peak_gpu_memory_mb`, TensorFlow's peak on GPU:0 since the configurations of this --jit_compile
value were built). The configurations of one --jit_compile value are built together and timed side by side: their steps
alternate (A, B, A, B, ...), then their parts do, so that a change of the machine's load affects them alike.
--profile_dir traces one more step of each configuration (mtard_tf.job.profiling) and adds `profile` to its line: the
trace file, the op time of each part of the step (`op_ms_by_part`, by the train step's name scopes) and the top op types
(`top_op_types_ms`).

With --compare_torch, the same step in PyTorch eager mode (mtard_tf.pytorch.step: same architectures, batch, attack
steps, data and precision) is timed in the same run, its steps alternating with TensorFlow's (TF, torch, TF, torch,
...) so that a change of the machine's load affects both alike, and the line adds `torch_images_per_s` and
`speedup_vs_torch` (TensorFlow images/s over PyTorch images/s). PyTorch gets TensorFlow's intra-op thread count, and
its OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE unless set): with spinning waits, on a machine that
another process also loads, each parallel region waits for a descheduled thread while the others spin (measured in
docs/performance.md); TensorFlow's thread pool hands a region's shards to whichever thread is free, so it does not
stall that way.

FLOPs of one step, from the models' forward FLOPs per image F (counted once by TensorFlow's profiler):
    B * (F_student * (2K + 6) + F_robust + F_clean)
K attack steps cost a forward and an input-gradient backward each (~2F); the two training passes (on x and x') a
forward and a full backward each (~3F); the teachers one forward each. Data are synthetic and already on the device,
so the figure is the step's, not the input pipeline's (--pipeline_batches measures that one alone).

With --pipeline_batches=N, the real training stream (mtard_tf.data.datasets.train_dataset) is timed alone over N batches
after the step measurements, once for each of --pipeline_sources (memory: the split held as uint8 tensors; disk:
examples read by index from its ArrayRecord files), each a JSON line with `input_pipeline_images_per_s` and, beside it,
the fastest step measured in the run (`step_images_per_s`) and their ratio `pipeline_over_step`: how many times what the
step consumes the stream delivers, when the two do not compete for the CPU.
"""

import dataclasses
import json
import os
import resource
import sys
import time

from absl import flags, logging

from mtard_tf import config as config_lib
from mtard_tf.job import startup

FLAGS = flags.FLAGS
# The benchmark's own meaning of three names of the run's flags: the settings to measure side by side, one
# configuration each (lists, where the run takes one value), and a trace of one more step of each configuration.
OWN_FLAGS = ("jit_compile", "precision", "profile_dir")


def define_flags(flag_values=FLAGS):
    """The benchmark's own flags, then every other flag of a run (config.define_flags: the models, the batch size,
    the attack, the balancing, the optimizer, the dataset; e.g. --flagfile=flags/cpu_small.cfg); called by run()."""
    if "steps" not in flag_values:
        flags.DEFINE_integer("steps", 3, "Timed steps per measurement.", lower_bound=1, flag_values=flag_values)
        flags.DEFINE_integer("warmup", 1, "Untimed steps before timing (tracing, compilation).", lower_bound=1,
                             flag_values=flag_values)
        flags.DEFINE_list("jit_compile", ["false", "true"], "XLA settings to measure (one JSON line each).",
                          flag_values=flag_values)
        flags.DEFINE_list("precision", ["float32"], "Keras dtype policies of the models (float32, mixed_float16, "
                          "mixed_bfloat16, or auto as mtard_tf.main resolves it), one configuration each.",
                          flag_values=flag_values)
        flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that measures the device's rate.",
                             flag_values=flag_values)
        flags.DEFINE_bool("compare_torch", False, "Also time the same step in PyTorch eager mode (needs torch), "
                          "alternating with TensorFlow's steps, and report torch_images_per_s and speedup_vs_torch.",
                          flag_values=flag_values)
        flags.DEFINE_integer("pipeline_batches", 0, "If > 0, also time this many batches of the real input "
                             "pipeline (--dataset, --data_dir).", flag_values=flag_values)
        flags.DEFINE_list("pipeline_sources", ["memory"], "Train sources of the input-pipeline measurement (memory, "
                          "disk: see --train_source), one JSON line each.", flag_values=flag_values)
        flags.register_validator("pipeline_sources",
                                 lambda sources: {s.strip() for s in sources} <= {"memory", "disk"},
                                 "--pipeline_sources must be a list of memory, disk", flag_values=flag_values)
        flags.DEFINE_string("profile_dir", None, "If set, one more step of each configuration is traced with the "
                            "TensorFlow profiler into <profile_dir>/<configuration> (tensorboard "
                            "--logdir=<profile_dir>), and its record gets the trace's op time by part of the step and "
                            "its top op types.", flag_values=flag_values)
    config_lib.define_flags(flag_values)


def run_config(flag_values):
    """The Config of the parsed run flags (all but OWN_FLAGS, which keep their defaults there)."""
    return config_lib.from_flags(flag_values, names={option.name for option in config_lib.options()
                                                     if option.name not in OWN_FLAGS})


def forward_flops(model, image_shape):
    """FLOPs of one forward pass of one image, counted by the TensorFlow profiler on the traced graph."""
    import tensorflow as tf
    from tensorflow.python.profiler import model_analyzer, option_builder

    function = tf.function(lambda x: model(x, training=False))
    graph = function.get_concrete_function(tf.TensorSpec([1, *image_shape], tf.float32)).graph
    options = option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation())
    options = options.with_empty_output().build()
    return model_analyzer.profile(graph, options=options).total_float_ops


def matmul_flops_per_second(size, dtype="float32", repeats=5):
    """The device's matmul rate in `dtype`, as 2 n^3 / time of the best of `repeats` runs."""
    import tensorflow as tf
    a = tf.cast(tf.random.uniform((size, size)), dtype)
    b = tf.cast(tf.random.uniform((size, size)), dtype)
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    matmul().numpy()
    best = min(_timed(lambda: matmul().numpy()) for _ in range(repeats))
    return 2 * size ** 3 / best


def _timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def seconds_per_call(functions, warmup, steps):
    """Seconds per call of each of `functions` (each must block until its work is done), after `warmup` calls of
    each; the `steps` timed calls of the functions alternate (f, g, f, g, ...)."""
    for _ in range(warmup):
        for function in functions:
            function()
    totals = [0.0] * len(functions)
    for _ in range(steps):
        for index, function in enumerate(functions):
            totals[index] += _timed(function)
    return [total / steps for total in totals]


def tensorflow_intra_op_threads():
    """TensorFlow's intra-op thread count: the configured one, else its default, the CPUs this process may use."""
    import tensorflow as tf
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    return configured or len(os.sched_getaffinity(0))


def peak_memory_mb():
    """{"peak_rss_mb": the process's peak resident memory so far (ru_maxrss, KiB on Linux)} and, with a GPU,
    "peak_gpu_memory_mb": TensorFlow's peak allocation on GPU:0 since its last reset."""
    import tensorflow as tf
    peaks = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if tf.config.list_logical_devices("GPU"):
        peaks["peak_gpu_memory_mb"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20, 1)
    return peaks


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one measurement builds (the run's configuration `config`, at `precision`) and how long it times."""
    config: config_lib.Config
    warmup: int
    steps: int
    precision: str
    compare_torch: bool = False

    @property
    def student(self):
        return self.config.student

    @property
    def clean_teacher(self):
        return self.config.clean_teacher.arch

    @property
    def robust_teacher(self):
        return self.config.robust_teacher.arch

    @property
    def batch_size(self):
        return self.config.schedule.batch_size

    @property
    def attack_steps(self):
        return self.config.attack.steps


def build(setup, jit_compile, strategy, num_classes=10, image_shape=(32, 32, 3)):
    """The compiled B-MTARD Distiller of `setup.config`, as a run builds it (its balancing rates constant: the
    milestones are epochs away), its models built under the Keras dtype policy `setup.precision`."""
    import keras
    from mtard_tf.methods import registry
    from mtard_tf.models import architectures
    config = setup.config
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(setup.precision)
    try:
        with strategy.scope():
            student = architectures.build_model(setup.student, num_classes, image_shape)
            clean = architectures.build_model(setup.clean_teacher, num_classes, image_shape)
            robust = architectures.build_model(setup.robust_teacher, num_classes, image_shape)
            distiller = registry.get_method("b_mtard").build(
                student, {"clean": clean, "robust": robust}, config, lambda rate: rate,
                **registry.trainer_arguments(config))
            distiller.compile(optimizer=keras.optimizers.SGD(config.schedule.learning_rate,
                                                             momentum=config.schedule.momentum),
                              jit_compile=jit_compile)
            # Keras' fit builds the optimizer before its first step; the benchmark calls the step itself, and under
            # several replicas slot variables created inside the step function fail.
            distiller.optimizer.build(distiller.model.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return distiller


def build_torch_step(setup, distiller, num_classes=10):
    """The PyTorch step of the same architectures, with the distiller's attack, balancing and optimizer settings."""
    import torch
    from mtard_tf.pytorch.step import TorchBMTARDStep
    return TorchBMTARDStep.from_specs(
        setup.student, setup.clean_teacher, setup.robust_teacher, num_classes,
        device="cuda" if torch.cuda.is_available() else "cpu", learning_rate=setup.config.schedule.learning_rate,
        momentum=setup.config.schedule.momentum,
        weight_decay=distiller.weight_decay, epsilon=distiller.epsilon, attack_step_size=distiller.attack_step_size,
        attack_steps=distiller.attack_steps, kl_scale=distiller.kl_scale, weight_rate=distiller.weight_rate,
        temperature_rate=distiller.temperature_rate, temperature_min=distiller.temperature_min,
        temperature_max=distiller.temperature_max, beta=distiller.beta, precision=setup.precision)


def torch_step_function(step, images, labels):
    """One PyTorch train step on the benchmark's batch (NHWC numpy -> NCHW tensors), blocking until it is done."""
    import torch
    images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(step.device)
    labels = torch.from_numpy(labels.astype("int64")).to(step.device)

    def call():
        step.train_step(images, labels)
        if step.device.type == "cuda":
            torch.cuda.synchronize(step.device)
    return call


class Measurement:
    """One configuration: its Distiller on a fixed synthetic batch, and blocking calls of its full step, of each part
    of the step (each its own tf.function) and, with setup.compare_torch, of the same step in PyTorch."""

    def __init__(self, setup, jit_compile, strategy):
        import numpy as np
        import tensorflow as tf
        self.setup, self.jit_compile, self.strategy = setup, jit_compile, strategy
        self.distiller = distiller = build(setup, jit_compile, strategy)
        rng = np.random.default_rng(0)
        images_array = rng.uniform(0, 1, (setup.batch_size, 32, 32, 3)).astype(np.float32)
        labels_array = rng.integers(0, 10, setup.batch_size).astype(np.int32)
        self.images, self.labels = tf.constant(images_array), tf.constant(labels_array)
        dataset = tf.data.Dataset.from_tensors((self.images, self.labels)).repeat()
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        distiller.make_train_function()
        train_function = distiller.train_function
        self.step = lambda: tf.nest.map_structure(lambda v: v.numpy(), train_function(iterator))
        self.torch, self.torch_step = None, None
        if setup.compare_torch:
            self.torch = build_torch_step(setup, distiller)
            self.torch_step = torch_step_function(self.torch, images_array, labels_array)
        one = tf.constant(1.0)
        step = tf.constant(0, tf.int64)
        self.parts = {
            "attack": self._part(lambda x, y: distiller.adversarial_examples(x, y)),
            "teachers": self._part(lambda x, y: distiller.teacher_targets(x, x, one, one)),
            # Recomputes the teachers' targets: their time is subtracted.
            "student_update": self._part(lambda x, y: distiller.update_student(
                x, x, *distiller.teacher_targets(x, x, one, one), step)[0]),
        }

    def _part(self, part):
        import tensorflow as tf
        strategy = self.strategy
        compiled = tf.function(lambda x, y: strategy.run(part, args=(x, y)), jit_compile=self.jit_compile)

        def call():
            outputs = compiled(self.images, self.labels)
            tf.nest.map_structure(lambda v: v.numpy() if hasattr(v, "numpy") else v,
                                  strategy.experimental_local_results(outputs))
        return call

    def profile(self, logdir):
        """Traces one more full step into `logdir`; its trace file and the op time by part and by op type."""
        from mtard_tf.job import profiling
        with profiling.trace(logdir):
            self.step()
        path = profiling.trace_files(logdir)[-1]
        by_type = profiling.op_seconds(path)
        return {"trace": path,
                "op_ms_by_part": {part: round(1000 * seconds, 1)
                                  for part, seconds in profiling.op_seconds(path, profiling.part_of).items()},
                "top_op_types_ms": {op_type: round(1000 * seconds, 1)
                                    for op_type, seconds in list(by_type.items())[:10]}}

    def record(self, seconds_per_step, torch_seconds_per_step, split, matmul_rates):
        """The JSON record of this configuration from its timings; `matmul_rates` maps dtype names to FLOP/s."""
        import keras
        import tensorflow as tf
        from mtard_tf.attacks import white_box
        setup, distiller, batch = self.setup, self.distiller, self.setup.batch_size
        flops_per_image = {name: forward_flops(model, (32, 32, 3)) for name, model in
                           (("student", distiller.student), ("clean_teacher", distiller.clean_teacher),
                            ("robust_teacher", distiller.robust_teacher))}
        step_flops = batch * (flops_per_image["student"] * (2 * setup.attack_steps + 6)
                              + flops_per_image["clean_teacher"] + flops_per_image["robust_teacher"])
        achieved = step_flops / seconds_per_step
        compute_dtype = keras.mixed_precision.Policy(setup.precision).compute_dtype
        gpu = bool(tf.config.list_logical_devices("GPU"))
        record = {
            "config": {"student": setup.student, "clean_teacher": setup.clean_teacher,
                       "robust_teacher": setup.robust_teacher, "batch_size": batch,
                       "attack_steps": setup.attack_steps, "replicas": self.strategy.num_replicas_in_sync,
                       "jit_compile": self.jit_compile, "precision": setup.precision,
                       "device": "GPU" if gpu else "CPU"},
            "images_per_s": round(batch / seconds_per_step, 2),
            "ms_per_step": round(1000 * seconds_per_step, 1),
        }
        if setup.compare_torch:
            import torch
            record["config"].update(torch_device=self.torch.device.type, torch_threads=torch.get_num_threads(),
                                    torch_omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""))
            record.update(torch_images_per_s=round(batch / torch_seconds_per_step, 2),
                          torch_ms_per_step=round(1000 * torch_seconds_per_step, 1),
                          speedup_vs_torch=round(torch_seconds_per_step / seconds_per_step, 3))
        record.update({
            "split_ms": {name: round(1000 * value, 1) for name, value in split.items()},
            "forward_flops_per_image": flops_per_image,
            "flops_per_step": step_flops,
            "achieved_flops_per_s": round(achieved),
            # The reference rate is the matmul's in the compute dtype of --precision (bfloat16 under mixed_bfloat16).
            "matmul_dtype": compute_dtype,
            "matmul_flops_per_s": round(matmul_rates[compute_dtype]),
            "matmul_flops_per_s_float32": round(matmul_rates["float32"]),
            "matmul_fraction": round(achieved / matmul_rates[compute_dtype], 4),
            # The attack-stall check (white_box.zero_gradient_fraction): ~0 unless 16-bit gradients underflow.
            "attack_zero_gradient_fraction": round(float(white_box.zero_gradient_fraction(
                distiller.cross_entropy_objective(self.labels), self.images)), 6),
        })
        return record


def measure(setups, jit_compile, strategy, matmul_rates, profile_dir=None):
    """Times the configurations `setups` (one --jit_compile value) side by side: their full steps through
    Distiller.train_step alternate (each followed by its PyTorch step with compare_torch), then each part of the
    step alternates across them. With `profile_dir`, one more step of each is traced into
    <profile_dir>/<configuration>. Returns their JSON records."""
    gpu_reset()
    measurements = [Measurement(setup, jit_compile, strategy) for setup in setups]
    calls = [call for m in measurements for call in (m.step, m.torch_step) if call is not None]
    seconds = iter(seconds_per_call(calls, setups[0].warmup, setups[0].steps))
    steps = [(next(seconds), next(seconds) if m.torch_step else None) for m in measurements]
    splits = [{} for _ in measurements]
    from mtard_tf.job.profiling import STEP_PARTS
    for part in STEP_PARTS:
        for split, value in zip(splits, seconds_per_call([m.parts[part] for m in measurements],
                                                         setups[0].warmup, setups[0].steps)):
            split[part] = value
    records = []
    for m, (step_seconds, torch_seconds), split in zip(measurements, steps, splits):
        split["student_update"] -= split["teachers"]
        record = m.record(step_seconds, torch_seconds, split, matmul_rates)
        if profile_dir:
            record["profile"] = m.profile(os.path.join(profile_dir, label(m.setup, jit_compile)))
        records.append({**record, **peak_memory_mb()})
    return records


def label(setup, jit_compile):
    """A configuration's name, e.g. "mixed_bfloat16-xla_off"."""
    return f"{setup.precision}-xla_{'on' if jit_compile else 'off'}"


def gpu_reset():
    """Resets TensorFlow's peak memory statistic on GPU:0, if there is one."""
    import tensorflow as tf
    if tf.config.list_logical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")


def pipeline_images_per_second(dataset, data_dir, batch_size, batches, source="memory", warmup=5):
    """Images/s of the training stream read from `source`, over `batches` batches after `warmup` (which start the
    parallel map and fill its buffers). The stream is iterated to the end of a finite slice of it, so no tf.data
    thread is still reading (by a Python function, for disk) when the process exits."""
    from mtard_tf.data import datasets
    stream = datasets.train_dataset(dataset, data_dir, batch_size, source=source).take(warmup + batches)
    iterator = iter(stream)
    for _ in range(warmup):
        next(iterator)
    seconds = _timed(lambda: [next(iterator) for _ in range(batches)])
    for _ in iterator:
        pass
    return batch_size * batches / seconds


def import_torch_passively_waiting():
    """Imports torch with passively waiting OpenMP threads (unless OMP_WAIT_POLICY is set; see the module's doc)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads its OpenMP runtime
    import torch  # noqa: F401


def precisions(values):
    """The distinct --precision `values`, in order; or a one-line error message."""
    allowed = ("auto", *config_lib.PRECISIONS)
    unknown = [value for value in values if value not in allowed]
    if unknown or not values:
        return f"--precision={','.join(values)}: expected a list of {', '.join(allowed)}"
    return list(dict.fromkeys(values))


def main(argv):
    del argv
    policies = precisions(FLAGS.precision)
    if isinstance(policies, str):
        print(f"error: {policies}", file=sys.stderr)
        return 1
    try:
        config = run_config(FLAGS)
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    batch_size = config.schedule.batch_size
    if FLAGS.compare_torch:
        try:
            import_torch_passively_waiting()
        except ImportError as error:
            print(f"error: --compare_torch needs torch ({error}); pip install -r requirements-torch.txt",
                  file=sys.stderr)
            return 1
    verbose = FLAGS["verbosity"].present
    if not verbose:
        logging.set_verbosity(logging.WARNING)
    startup.start_tensorflow(verbose)
    import keras
    from mtard_tf.job import distribute
    distribute.set_cpu_replicas(config.runtime.cpu_replicas)
    strategy = distribute.make_strategy()
    # "auto" as mtard_tf.main resolves it, on this device
    policies = list(dict.fromkeys(distribute.resolve_precision(policy)[0] for policy in policies))
    setups = [Setup(config, FLAGS.warmup, FLAGS.steps, policy, FLAGS.compare_torch) for policy in policies]
    if batch_size % strategy.num_replicas_in_sync:
        print(f"error: batch size {batch_size} is not divisible by {strategy.num_replicas_in_sync} replicas",
              file=sys.stderr)
        return 1
    if FLAGS.compare_torch:
        import torch
        torch.set_num_threads(tensorflow_intra_op_threads())
    matmul_rates = {}
    for policy in ("float32", *policies):
        dtype = keras.mixed_precision.Policy(policy).compute_dtype
        if dtype not in matmul_rates:
            matmul_rates[dtype] = matmul_flops_per_second(FLAGS.matmul_size, dtype)
    step_rates = []
    for value in FLAGS.jit_compile:
        jit_compile = value.strip().lower() in ("1", "true", "yes")
        if jit_compile and strategy.num_replicas_in_sync > 1:
            print(json.dumps({"config": {"jit_compile": True, "replicas": strategy.num_replicas_in_sync},
                              "skipped": "XLA does not work under MirroredStrategy with several replicas"}))
            continue
        for record in measure(setups, jit_compile, strategy, matmul_rates, FLAGS.profile_dir):
            step_rates.append(record["images_per_s"])
            print(json.dumps(record), flush=True)
    for source in FLAGS.pipeline_sources if FLAGS.pipeline_batches else ():  # a UserError: startup.run_app
        rate = pipeline_images_per_second(config.data.source, config.data.data_dir, batch_size,
                                          FLAGS.pipeline_batches, source.strip())
        record = {"input_pipeline_images_per_s": round(rate, 1), "train_source": source.strip(),
                  "batch_size": batch_size}
        if step_rates:
            record.update(step_images_per_s=max(step_rates), pipeline_over_step=round(rate / max(step_rates), 1))
        print(json.dumps(record), flush=True)
    return 0

def run():
    define_flags()
    startup.run_app(main)


if __name__ == "__main__":
    run()
