"""Command line of mtard_tf: python -m mtard_tf.main --mode=... (flags are read here and nowhere else)."""

import os
import sys

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ info/warning chatter; errors still show

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "distill", ["distill"], "What to run.")
flags.DEFINE_string("dataset", "cifar10", "tensorflow-datasets image classification dataset name.")
flags.DEFINE_string("data_dir", None, "tfds data directory holding the prepared dataset (offline use).")
flags.DEFINE_string("model_dir", "runs/cifar10", "Where checkpoints, TensorBoard logs and models are written.")
flags.DEFINE_integer("seed", 0, "Random seed (initialisation, data order, augmentation, attack noise).")
flags.DEFINE_integer("cpu_replicas", 1, "Split the CPU into N logical devices (multi-replica development).",
                     lower_bound=1)

# Models.
flags.DEFINE_string("student", "resnet18", "Student architecture: NAME or NAME:key=value,... (see models.py).")
flags.DEFINE_string("clean_teacher", None, "Clean (naturally trained) teacher, a .keras file.")
flags.DEFINE_string("robust_teacher", None, "Robust (adversarially trained) teacher, a .keras file.")
flags.DEFINE_boolean("sync_batchnorm", False, "Synchronise BatchNorm statistics across replicas in the student.")

# Training schedule (SPEC 1.5).
flags.DEFINE_integer("epochs", 300, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: train examples // batch size).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Global batch size (split over the replicas).", lower_bound=1)
flags.DEFINE_integer("validation_steps", None, "Test batches per end-of-epoch validation (default: all).",
                     lower_bound=1)
flags.DEFINE_integer("log_every_n_steps", 1, "TensorBoard scalars every N training steps.", lower_bound=1)
flags.DEFINE_float("learning_rate", 0.1, "SGD learning rate.", lower_bound=0.0)
flags.DEFINE_float("momentum", 0.9, "SGD momentum.", lower_bound=0.0)
flags.DEFINE_float("weight_decay", 2e-4, "L2 weight decay (coupled, as PyTorch SGD).", lower_bound=0.0)
flags.DEFINE_list("milestones", ["215", "260", "285"], "Epochs at which lr, weight_rate and temperature_rate "
                  "are multiplied by --decay.")
flags.DEFINE_float("decay", 0.1, "Decay factor at each milestone.", lower_bound=0.0)
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "XLA for the train step; auto: on with one replica, off with several.")

# Attack (SPEC 1.1).
flags.DEFINE_float("epsilon", 8 / 255, "L-inf radius of the attack, in [0, 1] pixel units.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.")
flags.DEFINE_float("attack_step_size", 2 / 255, "PGD step size of the training attack.")
flags.DEFINE_integer("eval_attack_steps", 20, "PGD steps of the end-of-epoch validation attack.", lower_bound=1)

# Balancing (SPEC 1.2-1.4).
flags.DEFINE_enum("balance", "b_mtard", ["b_mtard", "mtard"],
                  "b_mtard: entropy-balanced temperatures + normalised loss weights (TPAMI 2024); "
                  "mtard: loss weights with power beta, temperatures fixed at 1 (ECCV 2022).")
flags.DEFINE_float("weight_rate", 0.025, "eta_w: learning rate of the loss weights.", lower_bound=0.0)
flags.DEFINE_float("temperature_rate", 0.001, "eta_tau: learning rate of the teacher temperatures.",
                   lower_bound=0.0)
flags.DEFINE_float("temperature_min", 1.0, "Lower bound of the teacher temperatures.", lower_bound=0.0)
flags.DEFINE_float("temperature_max", 10.0, "Upper bound of the teacher temperatures.", lower_bound=0.0)
flags.DEFINE_float("beta", 1.0, "Power of the relative loss progress in the weight rule (MTARD).")
flags.DEFINE_float("kl_scale", 1.0, "Multiplies both distillation terms (10 in the reference for CIFAR-100).",
                   lower_bound=0.0)

flags.register_validator("epsilon", lambda v: 0 < v <= 1, "--epsilon must be in (0, 1]")
flags.register_validator("attack_step_size", lambda v: 0 < v <= 1, "--attack_step_size must be in (0, 1]")
flags.register_validator("attack_steps", lambda v: v >= 1, "--attack_steps must be at least 1")
flags.register_validator("milestones", lambda v: all(m.strip().isdigit() for m in v),
                         "--milestones must be a comma-separated list of epoch numbers")
flags.register_multi_flags_validator(
    ["temperature_min", "temperature_max"], lambda f: f["temperature_min"] <= f["temperature_max"],
    "--temperature_min must not exceed --temperature_max")
flags.register_multi_flags_validator(
    ["temperature_min"], lambda f: f["temperature_min"] > 0, "--temperature_min must be positive")


def distill_config():
    from mtard_tf.training import DistillConfig
    return DistillConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, student=FLAGS.student,
        clean_teacher=FLAGS.clean_teacher, robust_teacher=FLAGS.robust_teacher, model_dir=FLAGS.model_dir,
        epochs=FLAGS.epochs, steps_per_epoch=FLAGS.steps_per_epoch, batch_size=FLAGS.batch_size,
        validation_steps=FLAGS.validation_steps, log_every_n_steps=FLAGS.log_every_n_steps, seed=FLAGS.seed,
        balance=FLAGS.balance, epsilon=FLAGS.epsilon, attack_steps=FLAGS.attack_steps,
        attack_step_size=FLAGS.attack_step_size, eval_attack_steps=FLAGS.eval_attack_steps,
        learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay,
        milestones=tuple(int(m) for m in FLAGS.milestones), decay=FLAGS.decay, weight_rate=FLAGS.weight_rate,
        temperature_rate=FLAGS.temperature_rate, temperature_min=FLAGS.temperature_min,
        temperature_max=FLAGS.temperature_max, beta=FLAGS.beta, kl_scale=FLAGS.kl_scale,
        jit_compile={"auto": None, "true": True, "false": False}[FLAGS.jit_compile],
        sync_batchnorm=FLAGS.sync_batchnorm)


def make_strategy():
    from mtard_tf import training
    strategy = training.make_strategy()
    devices = ", ".join(strategy.extended.worker_devices)
    print(f"MirroredStrategy: {strategy.num_replicas_in_sync} replica(s) on {devices}")
    return strategy


def run_distill():
    from mtard_tf import training
    path, _ = training.distill(distill_config(), make_strategy())
    print(f"student saved to {path}")


MODES = {"distill": run_distill}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (tfds) drown the progress bar
    from mtard_tf import training  # imports TensorFlow; devices are configured right after
    training.set_cpu_replicas(FLAGS.cpu_replicas)
    from mtard_tf.data import DataUnavailableError
    from mtard_tf.teachers import TeacherError
    try:
        os.makedirs(FLAGS.model_dir, exist_ok=True)
        with open(os.path.join(FLAGS.model_dir, "flags.txt"), "w") as f:
            f.write(FLAGS.flags_into_string())
        MODES[FLAGS.mode]()
    except (DataUnavailableError, TeacherError, ValueError, OSError) as error:
        logging.debug("error", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()
