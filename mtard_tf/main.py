"""Command line of mtard_tf: python -m mtard_tf.main --mode=... (flags are read here and nowhere else)."""

import os
import sys

from absl import app, flags, logging

from mtard_tf import startup

FLAGS = flags.FLAGS

MODES = ("all", "distill", "train_teacher", "evaluate", "export")
# baselines.METHOD_NAMES (spelled out here: flags are defined before TensorFlow is imported; a test checks they agree).
METHOD_NAMES = ("natural", "sat", "trades", "ard", "rslad", "adaad", "mtard", "b_mtard")
DISTILLER_METHODS = ("b_mtard", "mtard")
STRATEGIES = ("mirrored", "multi_worker")  # training.STRATEGIES (a test checks they agree)
flags.DEFINE_enum("mode", "all", MODES, "all: teachers (trained unless given or present), the student, "
                  "evaluation, export, each skipped when its output exists; or one of those stages alone.")
flags.DEFINE_enum("method", "b_mtard", METHOD_NAMES,
                  "How --mode=all / --mode=distill train the student (the methods of the paper's tables): "
                  "b_mtard, mtard (two teachers); "
                  "ard, rslad, adaad (robust teacher); sat (PGD-AT), trades, natural (no teacher).")
flags.DEFINE_string("dataset", "cifar10", "tensorflow-datasets image classification dataset name.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory (default: tfds' own, ~/tensorflow_datasets).")
flags.DEFINE_boolean("download", True, "Download and prepare the dataset into --data_dir on first use; "
                     "--nodownload fails at once when it is not there (offline use).")
flags.DEFINE_string("model_dir", "runs/cifar10", "Where checkpoints, TensorBoard logs and models are written.")
flags.DEFINE_integer("seed", 0, "Random seed (initialisation, data order, augmentation, attack noise).")
flags.DEFINE_integer("cpu_replicas", 1, "Split the CPU into N logical devices (multi-replica development).",
                     lower_bound=1)
flags.DEFINE_enum("strategy", "mirrored", STRATEGIES,
                  "mirrored: MirroredStrategy over this machine's GPUs (else its CPU); multi_worker: "
                  "MultiWorkerMirroredStrategy over the workers in the TF_CONFIG environment variable (start the "
                  "same command on every worker; --model_dir on storage all of them see).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"],
                  "Keras dtype policy of the models built here: mixed_* computes in 16 bits on GPUs/TPUs; "
                  "logits, losses, softmax, entropy and the balancing state stay float32.")
flags.register_multi_flags_validator(
    ["strategy", "cpu_replicas"], lambda f: f["strategy"] == "mirrored" or f["cpu_replicas"] == 1,
    "--cpu_replicas applies to --strategy=mirrored only (a multi-worker run has one CPU replica per worker)")

# Models.
flags.DEFINE_string("student", "resnet18", "Student architecture: NAME or NAME:key=value,... (see models.py).")
flags.DEFINE_string("clean_teacher", None, "Clean (naturally trained) teacher, a .keras file.")
flags.DEFINE_string("robust_teacher", None, "Robust (adversarially trained) teacher, a .keras file.")
flags.DEFINE_boolean("sync_batchnorm", False, "Synchronise BatchNorm statistics across replicas.")

# Teachers trained in the app (--mode=train_teacher, and --mode=all when a teacher file is missing).
flags.DEFINE_enum("teacher", "clean", ["clean", "robust"], "Which teacher --mode=train_teacher trains.")
flags.DEFINE_string("clean_teacher_arch", "resnet56", "Clean teacher architecture (NAME or NAME:key=value,...).")
flags.DEFINE_string("robust_teacher_arch", "wrn34_10", "Robust teacher architecture.")
flags.DEFINE_enum("robust_method", "trades", ["trades", "pgd_at"], "Adversarial training of the robust teacher.")
flags.DEFINE_float("trades_beta", 6.0, "TRADES beta.", lower_bound=0.0)
flags.DEFINE_integer("clean_teacher_epochs", 200, "Epochs of natural training.", lower_bound=1)
flags.DEFINE_integer("robust_teacher_epochs", 100, "Epochs of adversarial training.", lower_bound=1)
flags.DEFINE_float("teacher_learning_rate", 0.1, "SGD learning rate of teacher training.", lower_bound=0.0)
flags.DEFINE_enum("clean_teacher_schedule", "cosine", ["cosine", "step"], "Learning-rate schedule, clean teacher.")
flags.DEFINE_enum("robust_teacher_schedule", "step", ["cosine", "step"], "Learning-rate schedule, robust teacher.")
flags.DEFINE_list("clean_teacher_milestones", ["100", "150"], "Step-schedule epochs (x --decay), clean teacher.")
flags.DEFINE_list("robust_teacher_milestones", ["75", "90"], "Step-schedule epochs (x --decay), robust teacher.")

# Model selection of the student.
flags.DEFINE_enum("select", "last", ["last", "best_test", "best_holdout"],
                  "Which student student.keras is: last (the last epoch's); best_test (the B-MTARD reference's "
                  "protocol: the best (clean + PGD-TRADES-20)/2 on the test split, at epoch 1, every "
                  "--select_every_before epochs before the first milestone and every epoch from it; its test figures "
                  "are optimistic); best_holdout (the same on --holdout_examples train images kept out of training). "
                  "The last model is kept as student_last.keras.")
flags.DEFINE_integer("select_every_before", 20, "Selection evaluation every N epochs before the first milestone.",
                     lower_bound=1)
flags.DEFINE_integer("select_examples", None, "Images of the selection split evaluated (default: all of it).",
                     lower_bound=1)
flags.DEFINE_integer("holdout_examples", 1000, "With --select=best_holdout: the last N train images, kept out of "
                     "training (teachers trained by this run too) for selection.", lower_bound=1)

# Evaluation (the paper's attacks: FGSM, PGD-SAT, PGD-TRADES, CW-inf, AutoAttack) and export (TF Serving).
flags.DEFINE_string("model", None, "The .keras model that --mode=evaluate / --mode=export works on.")
flags.DEFINE_list("attacks", ["clean", "fgsm", "pgd_sat", "pgd_trades", "cw", "autoattack"],
                  "Attacks of the evaluation.")
flags.DEFINE_integer("num_eval_examples", None, "Evaluate on the first N test images (default: all).",
                     lower_bound=1)
flags.DEFINE_integer("eval_batch_size", 250, "Images per evaluation batch.", lower_bound=1)
flags.DEFINE_string("export_dir", "saved_models", "Root of the TF Serving model directories.")
flags.DEFINE_string("model_name", "mtard_student", "Model name under --export_dir (TF Serving's model name).")
flags.DEFINE_integer("model_version", None, "Export version (default: the next free one).", lower_bound=1)

# Training schedule (the paper's CIFAR setting; MTARD-extension resnet18_mtard_cifar10.py).
flags.DEFINE_integer("epochs", 300, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: train examples // batch size).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Global batch size (split over the replicas).", lower_bound=1)
flags.DEFINE_integer("validation_steps", None, "Test batches per end-of-epoch validation (default: all).",
                     lower_bound=1)
flags.DEFINE_integer("log_every_n_steps", 1, "TensorBoard scalars every N training steps.", lower_bound=1)
flags.DEFINE_integer("checkpoint_every_n_steps", 0, "Also checkpoint every N training steps (0: at epoch ends only).",
                     lower_bound=0)
flags.DEFINE_float("learning_rate", 0.1, "SGD learning rate.", lower_bound=0.0)
flags.DEFINE_float("momentum", 0.9, "SGD momentum.", lower_bound=0.0)
flags.DEFINE_float("weight_decay", 2e-4, "L2 weight decay (coupled, as PyTorch SGD).", lower_bound=0.0)
flags.DEFINE_list("milestones", ["215", "260", "285"], "Epochs at which lr, weight_rate and temperature_rate "
                  "are multiplied by --decay.")
flags.DEFINE_float("decay", 0.1, "Decay factor at each milestone.", lower_bound=0.0)
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "XLA for the train step; auto: on for a single GPU, off on CPU (slower there) "
                  "and with several replicas (unsupported).")

# The training attack: PGD on the student's cross-entropy (MTARD mtard/mtard_loss.py).
flags.DEFINE_float("epsilon", 8 / 255, "L-inf radius of the attack, in [0, 1] pixel units.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.")
flags.DEFINE_float("attack_step_size", 2 / 255, "PGD step size of the training attack.")
flags.DEFINE_integer("eval_attack_steps", 20, "PGD steps of the end-of-epoch validation attack.", lower_bound=1)

# Balancing: Entropy-Based Balance and Normalization Loss Balance (TPAMI 2024; resnet18_mtard_cifar10.py).
flags.DEFINE_enum("balance", "b_mtard", ["b_mtard", "mtard"],
                  "b_mtard: entropy-balanced temperatures + normalised loss weights (TPAMI 2024); "
                  "mtard: loss weights with power beta, temperatures fixed at 1 (ECCV 2022).")
flags.DEFINE_float("weight_rate", 0.025, "eta_w: learning rate of the loss weights.", lower_bound=0.0)
flags.DEFINE_float("temperature_rate", 0.001, "eta_tau: learning rate of the teacher temperatures.",
                   lower_bound=0.0)
flags.DEFINE_float("temperature_min", 1.0, "Lower bound of the teacher temperatures.", lower_bound=0.0)
flags.DEFINE_float("temperature_max", 10.0, "Upper bound of the teacher temperatures.", lower_bound=0.0)
flags.DEFINE_float("beta", 1.0, "Power of the relative loss progress in the weight rule (MTARD).")
flags.DEFINE_float("kl_scale", 1.0, "Multiplies the distillation KL terms of b_mtard, mtard and rslad (10 in "
                   "their reference code for CIFAR-100; AdaAD's code changes its reduction instead).", lower_bound=0.0)

# Baselines, with their papers' defaults; TRADES' beta is --trades_beta.
flags.DEFINE_float("ard_temperature", 30.0, "ARD: distillation temperature tau.", lower_bound=0.0)
flags.DEFINE_float("ard_alpha", 1.0, "ARD: weight of the tau^2 KL term; 1 - alpha weighs CE on clean images.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("rslad_adv_weight", 5 / 6, "RSLAD: weight of the KL on adversarial images (1 - w on clean).",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("adaad_alpha", 1.0, "AdaAD: weight of the KL on adversarial images (1 - alpha on clean).",
                   lower_bound=0.0, upper_bound=1.0)
flags.register_validator("ard_temperature", lambda v: v > 0, "--ard_temperature must be positive")

flags.register_validator("epsilon", lambda v: 0 < v <= 1, "--epsilon must be in (0, 1]")
flags.register_validator("attack_step_size", lambda v: 0 < v <= 1, "--attack_step_size must be in (0, 1]")
flags.register_validator("attack_steps", lambda v: v >= 1, "--attack_steps must be at least 1")
for _name in ("milestones", "clean_teacher_milestones", "robust_teacher_milestones"):
    flags.register_validator(_name, lambda v: all(m.strip().isdigit() for m in v),
                             f"--{_name} must be a comma-separated list of epoch numbers")
flags.register_validator("attacks", lambda v: set(v) <= {"clean", "fgsm", "pgd_sat", "pgd_trades", "cw",
                                                         "autoattack"},
                         "--attacks must be a subset of clean,fgsm,pgd_sat,pgd_trades,cw,autoattack")
flags.register_multi_flags_validator(
    ["temperature_min", "temperature_max"], lambda f: f["temperature_min"] <= f["temperature_max"],
    "--temperature_min must not exceed --temperature_max")
flags.register_multi_flags_validator(
    ["temperature_min"], lambda f: f["temperature_min"] > 0, "--temperature_min must be positive")


def _epochs(values):
    return tuple(int(v) for v in values)


def student_method():
    """--method; the older --balance=b_mtard|mtard chooses the distiller when --method is not given."""
    if not FLAGS["method"].present:
        return FLAGS.balance if FLAGS["balance"].present else FLAGS.method
    if FLAGS["balance"].present and FLAGS.method in DISTILLER_METHODS and FLAGS.balance != FLAGS.method:
        raise ValueError(f"--balance={FLAGS.balance} contradicts --method={FLAGS.method}; give --method alone")
    return FLAGS.method


def run_config():
    from mtard_tf.training import RunConfig
    method = student_method()
    return RunConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model_dir=FLAGS.model_dir, seed=FLAGS.seed,
        batch_size=FLAGS.batch_size, steps_per_epoch=FLAGS.steps_per_epoch, validation_steps=FLAGS.validation_steps,
        log_every_n_steps=FLAGS.log_every_n_steps, checkpoint_every_n_steps=FLAGS.checkpoint_every_n_steps,
        jit_compile={"auto": None, "true": True, "false": False}[FLAGS.jit_compile],
        sync_batchnorm=FLAGS.sync_batchnorm, epsilon=FLAGS.epsilon, attack_steps=FLAGS.attack_steps,
        attack_step_size=FLAGS.attack_step_size, eval_attack_steps=FLAGS.eval_attack_steps,
        momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay, decay=FLAGS.decay, student=FLAGS.student,
        clean_teacher=FLAGS.clean_teacher or "", robust_teacher=FLAGS.robust_teacher or "", epochs=FLAGS.epochs,
        learning_rate=FLAGS.learning_rate, milestones=_epochs(FLAGS.milestones), method=method,
        balance=method if method in DISTILLER_METHODS else FLAGS.balance,
        weight_rate=FLAGS.weight_rate, temperature_rate=FLAGS.temperature_rate,
        temperature_min=FLAGS.temperature_min, temperature_max=FLAGS.temperature_max, beta=FLAGS.beta,
        kl_scale=FLAGS.kl_scale, clean_teacher_arch=FLAGS.clean_teacher_arch,
        robust_teacher_arch=FLAGS.robust_teacher_arch, clean_teacher_epochs=FLAGS.clean_teacher_epochs,
        robust_teacher_epochs=FLAGS.robust_teacher_epochs, teacher_learning_rate=FLAGS.teacher_learning_rate,
        clean_teacher_schedule=FLAGS.clean_teacher_schedule, robust_teacher_schedule=FLAGS.robust_teacher_schedule,
        clean_teacher_milestones=_epochs(FLAGS.clean_teacher_milestones),
        robust_teacher_milestones=_epochs(FLAGS.robust_teacher_milestones), robust_method=FLAGS.robust_method,
        trades_beta=FLAGS.trades_beta, ard_temperature=FLAGS.ard_temperature, ard_alpha=FLAGS.ard_alpha,
        rslad_adv_weight=FLAGS.rslad_adv_weight, adaad_alpha=FLAGS.adaad_alpha, select=FLAGS.select,
        select_every_before=FLAGS.select_every_before, select_examples=FLAGS.select_examples,
        holdout_examples=FLAGS.holdout_examples)


def eval_config():
    from mtard_tf.pipeline import EvalConfig
    return EvalConfig(attacks=tuple(FLAGS.attacks), num_examples=FLAGS.num_eval_examples,
                      batch_size=FLAGS.eval_batch_size)


def export_config():
    from mtard_tf.pipeline import ExportConfig
    return ExportConfig(export_dir=FLAGS.export_dir, model_name=FLAGS.model_name, version=FLAGS.model_version)


def make_strategy():
    from mtard_tf import training
    strategy = training.make_strategy(FLAGS.strategy)
    devices = ", ".join(strategy.extended.worker_devices)
    print(f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} replica(s) in all; this process: {devices}"
          f"{'' if training.is_chief(strategy) else ' (non-chief worker)'}")
    return strategy


def required_model():
    if not FLAGS.model:
        raise ValueError(f"--mode={FLAGS.mode} needs --model=PATH.keras")
    return FLAGS.model


def run_mode(mode):
    from mtard_tf import pipeline, training
    if mode == "all":
        pipeline.run_all(run_config(), eval_config(), export_config(), make_strategy())
    elif mode == "distill":
        config = run_config()
        strategy = make_strategy()
        path, _ = training.train_student(config, config.method, strategy)
        print(f"student ({config.method}) saved to {path}")
        if training.is_chief(strategy):
            pipeline.balance_picture(config)
    elif mode == "train_teacher":
        path, _ = training.train_teacher(run_config(), FLAGS.teacher, make_strategy())
        print(f"{FLAGS.teacher} teacher saved to {path}")
    elif mode == "evaluate":
        output_dir = os.path.join(FLAGS.model_dir, "eval")
        pipeline.evaluate_stage(run_config(), eval_config(), required_model(), output_dir, reuse=False)
        print(f"report: {os.path.join(output_dir, 'report.md')}")
    elif mode == "export":
        pipeline.export_stage(run_config(), export_config(), required_model(), reuse=False)


def run_guarded(argv, body):
    """The common frame of a command: devices, `<model_dir>/flags.txt`, then body(); an error is one line, exit 1."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    verbose = FLAGS["verbosity"].present
    if not verbose:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (tfds) drown the progress bar
    startup.start_tensorflow(verbose)
    from mtard_tf import training
    training.set_cpu_replicas(FLAGS.cpu_replicas)
    import keras
    keras.mixed_precision.set_global_policy(FLAGS.precision)  # before any model is built
    from mtard_tf import data
    from mtard_tf.checkpointing import NonFiniteLossError
    from mtard_tf.data import DataUnavailableError
    from mtard_tf.teachers import TeacherError
    try:
        try:
            os.makedirs(FLAGS.model_dir, exist_ok=True)
            with open(os.path.join(FLAGS.model_dir, "flags.txt"), "w") as f:
                f.write(FLAGS.flags_into_string())
        except OSError as error:
            raise OSError(f"cannot write to --model_dir={FLAGS.model_dir}: {error.strerror or error}") from error
        data.prepare(FLAGS.dataset, FLAGS.data_dir, FLAGS.download)
        body()
    except (DataUnavailableError, TeacherError, NonFiniteLossError, ValueError, OSError) as error:
        logging.debug("error", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv):
    return run_guarded(argv, lambda: run_mode(FLAGS.mode))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
