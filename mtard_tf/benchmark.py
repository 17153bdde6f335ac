"""Throughput of the B-MTARD train step: python -m mtard_tf.benchmark [flags].

For each configuration (each --jit_compile value), prints one JSON line with images/s, ms per step, the split of a
step into attack / teachers / student update (each part timed alone as its own tf.function), the FLOPs of one step
and the achieved FLOP/s, and the FLOP/s of a large float32 matmul on the same device measured in the same run, so
`matmul_fraction` says how much of the machine's attainable rate the step reaches.

FLOPs of one step, from the models' forward FLOPs per image F (counted once by TensorFlow's profiler):
    B * (F_student * (2K + 6) + F_robust + F_clean)
K attack steps cost a forward and an input-gradient backward each (~2F); the two training passes (on x and x') a
forward and a full backward each (~3F); the teachers one forward each. Data are synthetic and already on the device,
so the figure is the step's, not the input pipeline's (--pipeline_batches measures that one alone).
"""

import dataclasses
import json
import sys
import time

from absl import app, flags, logging

from mtard_tf import startup

FLAGS = flags.FLAGS
flags.DEFINE_string("student", "resnet18:width=8", "Student architecture.")
flags.DEFINE_string("clean_teacher_arch", "resnet56:depth=14", "Clean teacher architecture.")
flags.DEFINE_string("robust_teacher_arch", "wrn34_10:depth=10,widen=2", "Robust teacher architecture.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("steps", 3, "Timed steps per measurement.", lower_bound=1)
flags.DEFINE_integer("warmup", 1, "Untimed steps before timing (tracing, compilation).", lower_bound=1)
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.", lower_bound=1)
flags.DEFINE_integer("cpu_replicas", 1, "Split the CPU into N logical devices.", lower_bound=1)
flags.DEFINE_list("jit_compile", ["false", "true"], "XLA settings to measure (one JSON line each).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"], "Keras dtype policy.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square float32 matmul that measures the device's rate.")
flags.DEFINE_integer("pipeline_batches", 0, "If > 0, also time this many batches of the real input pipeline.")
flags.DEFINE_string("dataset", "cifar10", "Dataset of the input-pipeline measurement.")
flags.DEFINE_string("data_dir", None, "tfds data directory of the input-pipeline measurement.")


def forward_flops(model, image_shape):
    """FLOPs of one forward pass of one image, counted by the TensorFlow profiler on the traced graph."""
    import tensorflow as tf
    from tensorflow.python.profiler import model_analyzer, option_builder

    function = tf.function(lambda x: model(x, training=False))
    graph = function.get_concrete_function(tf.TensorSpec([1, *image_shape], tf.float32)).graph
    options = option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation())
    options = options.with_empty_output().build()
    return model_analyzer.profile(graph, options=options).total_float_ops


def matmul_flops_per_second(size, repeats=5):
    """The device's float32 matmul rate, as 2 n^3 / time of the best of `repeats` runs."""
    import tensorflow as tf
    a = tf.random.uniform((size, size))
    b = tf.random.uniform((size, size))
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    matmul().numpy()
    best = min(_timed(lambda: matmul().numpy()) for _ in range(repeats))
    return 2 * size ** 3 / best


def _timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def time_per_call(function, warmup, steps):
    """Seconds per call of `function` (which must block until its work is done) after `warmup` calls."""
    for _ in range(warmup):
        function()
    return _timed(lambda: [function() for _ in range(steps)]) / steps


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one measurement builds and how long it times."""
    student: str
    clean_teacher: str
    robust_teacher: str
    batch_size: int
    attack_steps: int
    warmup: int
    steps: int
    precision: str


def build(setup, jit_compile, strategy, num_classes=10, image_shape=(32, 32, 3)):
    import keras
    from mtard_tf import models
    from mtard_tf.distiller import Distiller
    with strategy.scope():
        student = models.build_model(setup.student, num_classes, image_shape)
        clean = models.build_model(setup.clean_teacher, num_classes, image_shape)
        robust = models.build_model(setup.robust_teacher, num_classes, image_shape)
        distiller = Distiller(student, clean, robust, attack_steps=setup.attack_steps)
        distiller.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=jit_compile)
    return distiller


def measure(setup, jit_compile, strategy, matmul_rate):
    """Times full steps through Distiller.train_step and each of its parts; returns the JSON record."""
    import numpy as np
    import tensorflow as tf
    from mtard_tf import attacks
    distiller = build(setup, jit_compile, strategy)
    batch = setup.batch_size
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 1, (batch, 32, 32, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, 10, batch), tf.int32)
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((images, labels)).repeat())
    iterator = iter(dataset)
    distiller.make_train_function()
    train_function = distiller.train_function
    seconds_per_step = time_per_call(lambda: tf.nest.map_structure(
        lambda v: v.numpy(), train_function(iterator)), setup.warmup, setup.steps)

    def run_part(part):
        compiled = tf.function(lambda x, y: strategy.run(part, args=(x, y)), jit_compile=jit_compile)
        def call():
            outputs = compiled(images, labels)
            tf.nest.map_structure(lambda v: v.numpy() if hasattr(v, "numpy") else v,
                                  strategy.experimental_local_results(outputs))
        return time_per_call(call, setup.warmup, setup.steps)

    one = tf.constant(1.0)
    step = tf.constant(0, tf.int64)
    split = {
        "attack": run_part(lambda x, y: distiller.adversarial_examples(x, y)),
        "teachers": run_part(lambda x, y: distiller.teacher_targets(x, x, one, one)),
        "student_update": run_part(lambda x, y: distiller.update_student(
            x, x, *distiller.teacher_targets(x, x, one, one), step)[0]),
    }
    split["student_update"] -= split["teachers"]  # that part recomputes the teachers' targets

    flops_per_image = {name: forward_flops(model, (32, 32, 3)) for name, model in
                       (("student", distiller.student), ("clean_teacher", distiller.clean_teacher),
                        ("robust_teacher", distiller.robust_teacher))}
    step_flops = batch * (flops_per_image["student"] * (2 * setup.attack_steps + 6)
                          + flops_per_image["clean_teacher"] + flops_per_image["robust_teacher"])
    achieved = step_flops / seconds_per_step
    return {
        "config": {"student": setup.student, "clean_teacher": setup.clean_teacher,
                   "robust_teacher": setup.robust_teacher, "batch_size": batch,
                   "attack_steps": setup.attack_steps, "replicas": strategy.num_replicas_in_sync,
                   "jit_compile": jit_compile, "precision": setup.precision,
                   "device": "GPU" if tf.config.list_logical_devices("GPU") else "CPU"},
        "images_per_s": round(batch / seconds_per_step, 2),
        "ms_per_step": round(1000 * seconds_per_step, 1),
        "split_ms": {name: round(1000 * value, 1) for name, value in split.items()},
        "forward_flops_per_image": flops_per_image,
        "flops_per_step": step_flops,
        "achieved_flops_per_s": round(achieved),
        "matmul_flops_per_s": round(matmul_rate),
        "matmul_fraction": round(achieved / matmul_rate, 4),
        # The attack-stall check (attacks.zero_gradient_fraction): ~0 unless 16-bit gradients underflow.
        "attack_zero_gradient_fraction": round(float(attacks.zero_gradient_fraction(
            distiller.cross_entropy_objective(labels), images)), 6),
    }


def pipeline_images_per_second(dataset, data_dir, batch_size, batches):
    from mtard_tf import data
    iterator = iter(data.train_dataset(dataset, data_dir, batch_size))
    next(iterator)
    return batch_size * batches / _timed(lambda: [next(iterator) for _ in range(batches)])


def main(argv):
    del argv
    verbose = FLAGS["verbosity"].present
    if not verbose:
        logging.set_verbosity(logging.WARNING)
    startup.start_tensorflow(verbose)
    import keras
    from mtard_tf import distribute
    distribute.set_cpu_replicas(FLAGS.cpu_replicas)
    keras.mixed_precision.set_global_policy(FLAGS.precision)
    strategy = distribute.make_strategy()
    setup = Setup(FLAGS.student, FLAGS.clean_teacher_arch, FLAGS.robust_teacher_arch, FLAGS.batch_size,
                  FLAGS.attack_steps, FLAGS.warmup, FLAGS.steps, FLAGS.precision)
    if FLAGS.batch_size % strategy.num_replicas_in_sync:
        print(f"error: batch size {FLAGS.batch_size} is not divisible by {strategy.num_replicas_in_sync} replicas",
              file=sys.stderr)
        return 1
    matmul_rate = matmul_flops_per_second(FLAGS.matmul_size)
    for value in FLAGS.jit_compile:
        jit_compile = value.strip().lower() in ("1", "true", "yes")
        if jit_compile and strategy.num_replicas_in_sync > 1:
            print(json.dumps({"config": {"jit_compile": True, "replicas": strategy.num_replicas_in_sync},
                              "skipped": "XLA does not work under MirroredStrategy with several replicas"}))
            continue
        print(json.dumps(measure(setup, jit_compile, strategy, matmul_rate)), flush=True)
    if FLAGS.pipeline_batches:
        rate = pipeline_images_per_second(FLAGS.dataset, FLAGS.data_dir, FLAGS.batch_size, FLAGS.pipeline_batches)
        print(json.dumps({"input_pipeline_images_per_s": round(rate, 1), "batch_size": FLAGS.batch_size}))
    return 0


if __name__ == "__main__":
    app.run(main)
