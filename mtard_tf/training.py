"""Distillation runs: the strategy, the optimizer and schedules, fit with callbacks, and the saved student."""

import atexit
import dataclasses
import json
import os
import shutil
import tempfile
import time

import keras
import tensorflow as tf

from mtard_tf import baselines, checkpointing, data, evaluation, files, models, summaries, teachers
from mtard_tf.schedules import MilestoneDecay


def set_cpu_replicas(num_replicas):
    """Splits the CPU into `num_replicas` logical devices; must run before TensorFlow initialises its devices."""
    if num_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_replicas)])


STRATEGIES = ("mirrored", "multi_worker")


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


def save_model_atomic(model, path):
    """model.save, complete or absent (files.atomic_path)."""
    with files.atomic_path(path) as temporary:
        model.save(temporary)
    return path


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs; defaults are the paper's CIFAR-10 setting (MTARD-extension resnet18_mtard_cifar10.py)."""
    dataset: str = "cifar10"
    data_dir: str | None = None
    model_dir: str = "runs/cifar10"
    seed: int = 0
    batch_size: int = 128
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    log_every_n_steps: int = 1
    jit_compile: bool | None = None  # None: on for a single GPU only (see use_xla)
    sync_batchnorm: bool = False
    checkpoint_every_n_steps: int = 0  # 0: at the end of every epoch only
    verbose: int = 1
    # Attack of training (PGD on the student's CE) and of the per-epoch validation (PGD-SAT, 20 steps).
    epsilon: float = 8 / 255
    attack_steps: int = 10
    attack_step_size: float = 2 / 255
    eval_attack_steps: int = 20
    # Optimizer of every stage.
    momentum: float = 0.9
    weight_decay: float = 2e-4
    decay: float = 0.1
    # The student: `method` is one of baselines.METHOD_NAMES; `balance` is what `distill` uses
    # (b_mtard / mtard), kept equal to `method` by the command line when the method is one of those two.
    method: str = "b_mtard"
    student: str = "resnet18"
    clean_teacher: str = ""
    robust_teacher: str = ""
    epochs: int = 300
    learning_rate: float = 0.1
    milestones: tuple = (215, 260, 285)
    balance: str = "b_mtard"
    weight_rate: float = 0.025
    temperature_rate: float = 0.001
    temperature_min: float = 1.0
    temperature_max: float = 10.0
    beta: float = 1.0
    kl_scale: float = 1.0
    # Baselines (the papers' defaults).
    ard_temperature: float = 30.0
    ard_alpha: float = 1.0
    rslad_adv_weight: float = 5 / 6
    adaad_alpha: float = 1.0
    # Teachers trained in the app.
    clean_teacher_arch: str = "resnet56"
    robust_teacher_arch: str = "wrn34_10"
    clean_teacher_epochs: int = 200
    robust_teacher_epochs: int = 100
    teacher_learning_rate: float = 0.1
    clean_teacher_schedule: str = "cosine"
    robust_teacher_schedule: str = "step"
    clean_teacher_milestones: tuple = (100, 150)
    robust_teacher_milestones: tuple = (75, 90)
    robust_method: str = "trades"
    trades_beta: float = 6.0
    # Model selection of the student (see select_epochs): last, best_test or best_holdout.
    select: str = "last"
    select_every_before: int = 20
    select_examples: int | None = None  # None: the whole selection split
    holdout_examples: int = 1000  # held out of training with select="best_holdout"


def held_out(config):
    """How many train examples this run keeps out of training (for best_holdout selection)."""
    return config.holdout_examples if config.select == "best_holdout" else 0


def fit(trainer, config, work_dir, epochs, steps_per_epoch, strategy, callbacks=()):
    """model.fit for `epochs` x `steps_per_epoch` steps, resumable at any step, with everything under `work_dir`.

    Checkpoints (`checkpoints/`, every epoch and every `config.checkpoint_every_n_steps`) hold the model, the
    optimizer and the trainer's state; the data stream restarts at the restored step, so a resumed run computes what
    an uninterrupted one does. A resumed partial epoch is finished by its own fit call. TensorBoard scalars go to
    `tensorboard/`. Returns a keras History with the merged per-epoch logs of this call.
    """
    output_dir = writable_dir(strategy, work_dir)
    checkpoints = checkpointing.StepCheckpoints(trainer, os.path.join(work_dir, "checkpoints"),
                                                os.path.join(output_dir, "checkpoints"))
    step = checkpoints.restore_latest()
    total = epochs * steps_per_epoch
    if step:
        print(f"resuming from step {step} of {total} ({checkpoints.latest()})")
    validation = data.eval_dataset(config.dataset, config.data_dir, config.batch_size)
    callbacks = [
        checkpointing.NonFiniteLossGuard(checkpoints.directory),
        summaries.ScalarSummaries(os.path.join(output_dir, "tensorboard"), config.log_every_n_steps),
        *callbacks,  # after validation, before the epoch's checkpoint
        checkpointing.CheckpointCallback(checkpoints, config.checkpoint_every_n_steps),
    ]
    history = keras.callbacks.History()
    history.history = {}
    while step < total:
        epoch, done = divmod(step, steps_per_epoch)
        train = data.train_dataset(config.dataset, config.data_dir, config.batch_size, seed=config.seed,
                                   start_step=step, holdout=held_out(config))
        result = trainer.fit(train, initial_epoch=epoch, epochs=epoch + 1 if done else epochs,
                             steps_per_epoch=steps_per_epoch - done, validation_data=validation,
                             validation_steps=config.validation_steps, callbacks=callbacks, verbose=config.verbose,
                             shuffle=False)
        for key, values in result.history.items():
            history.history.setdefault(key, []).extend(values)
        step = checkpoints.step()
    if not history.history:  # finished before an interruption: the final validation is re-measured
        metrics = trainer.evaluate(validation, steps=config.validation_steps, verbose=0, return_dict=True)
        history.history = {f"val_{name}": [value] for name, value in metrics.items()}
    return history


def fit_and_save(trainer, config, strategy, work_dir, epochs, steps_per_epoch, path, callbacks=(), **summary):
    """fit, then the trained model to `path` (.keras) and a summary to the .json beside it: the last validation
    accuracies, the training wall time, the trainer's state and `summary`. Returns the fit history.

    On a multi-worker run every worker saves (into its writable_dir) and waits until all have: the chief's files are
    complete when this returns on any worker.
    """
    start = time.time()
    history = fit(trainer, config, work_dir, epochs, steps_per_epoch, strategy, callbacks)
    seconds = time.time() - start
    output = os.path.join(writable_dir(strategy, os.path.dirname(path)), os.path.basename(path))
    save_model_atomic(trainer.model, output)
    files.write_json(os.path.splitext(output)[0] + ".json",
                     {**final_metrics(history), **summary, "train_seconds": round(seconds, 1),
                      "state": {name: float(v.numpy()) for name, v in trainer.state_variables().items()}})
    barrier(strategy)
    return history


def _prepare(config, strategy):
    if config.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"batch size {config.batch_size} is not divisible by the "
                         f"{strategy.num_replicas_in_sync} replicas")
    keras.utils.set_random_seed(config.seed)
    info = data.load_info(config.dataset, config.data_dir)
    return info, config.steps_per_epoch or (info.num_train - held_out(config)) // config.batch_size


def use_xla(strategy, requested=None):
    """XLA for the train step: as requested, else on for a single GPU replica only.

    XLA fails under MirroredStrategy with several replicas ("resource ... located in device CPU:1 from device
    CPU:0"), and on the 2-core CPU it made the B-MTARD step 2.5x (paper models) to 4x (small models) slower
    (`python -m mtard_tf.benchmark`, README "Performance and scale").
    """
    if requested is not None:
        return requested
    return strategy.num_replicas_in_sync == 1 and bool(tf.config.list_logical_devices("GPU"))


def _compile(trainer, config, strategy, learning_rate):
    jit_compile = use_xla(strategy, config.jit_compile)
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=config.momentum),
                    jit_compile=jit_compile)


def _attack_args(config):
    return dict(epsilon=config.epsilon, attack_steps=config.attack_steps, attack_step_size=config.attack_step_size,
                weight_decay=config.weight_decay, seed=config.seed)


def final_metrics(history):
    """The last epoch's validation accuracies, e.g. {"clean_accuracy": 0.9, "pgd_accuracy": 0.5}."""
    return {key[len("val_"):]: float(values[-1]) for key, values in history.history.items()
            if key.startswith("val_")}


def train_student(config, method=None, strategy=None):
    """Trains the student with `method` (default `config.method`; see baselines.METHODS) into
    `<model_dir>/student.keras`; returns (path, history).

    Every method gets the same architecture, initialisation (seed), data order, optimizer, schedule (lr x decay at
    the milestones) and attack budget; it loads only the teachers it uses. `<model_dir>/student.json` holds the last
    validation accuracies, the method and the training wall time.
    """
    method = method or config.method
    spec = baselines.get_method(method)
    strategy = strategy or make_strategy()
    info, steps_per_epoch = _prepare(config, strategy)
    teacher_files = {"clean": config.clean_teacher, "robust": config.robust_teacher}
    for kind in spec.teachers:
        if not teacher_files[kind]:
            raise teachers.TeacherError(f"method '{method}' needs a {kind} teacher file (--{kind}_teacher)")
    with strategy.scope():
        frozen = {kind: teachers.load_teacher(teacher_files[kind], info.image_shape, info.num_classes)
                  for kind in spec.teachers}
        student = models.build_model(config.student, info.num_classes, info.image_shape,
                                     sync_batchnorm=config.sync_batchnorm)

        def schedule(value):
            return MilestoneDecay(value, config.milestones, steps_per_epoch, config.decay)

        trainer = spec.build(student, frozen, config, schedule, eval_attack_steps=config.eval_attack_steps,
                             **_attack_args(config))
        _compile(trainer, config, strategy, schedule(config.learning_rate))
    path = os.path.join(config.model_dir, "student.keras")
    if config.select == "last":
        history = fit_and_save(trainer, config, strategy, config.model_dir, config.epochs, steps_per_epoch, path,
                               method=method, selection={"mode": "last", "epoch": config.epochs})
        return path, history
    selection = ModelSelection(trainer.model, config, os.path.join(writable_dir(strategy, config.model_dir),
                                                                   "selection"))
    last_path = os.path.join(config.model_dir, "student_last.keras")
    history = fit_and_save(trainer, config, strategy, config.model_dir, config.epochs, steps_per_epoch, last_path,
                           callbacks=[selection], method=method)
    if is_chief(strategy):
        with open(os.path.splitext(last_path)[0] + ".json") as f:
            last = json.load(f)
        record = selection.record()
        files.write_json(os.path.splitext(path)[0] + ".json",
                   {"method": method, "train_seconds": last["train_seconds"], "state": last["state"],
                    "selection": {key: value for key, value in record.items() if key != "history"},
                    "selection_history": record["history"], "last": {"path": last_path, **final_metrics(history)}})
        with files.atomic_path(path) as temporary:  # the selected model's file as it is, not loaded and re-saved
            shutil.copyfile(selection.best_path, temporary)
    barrier(strategy)
    return path, history


SELECT_MODES = ("last", "best_test", "best_holdout")
SELECTION_METRIC = "(clean + PGD-TRADES-20) / 2"


def select_epochs(epochs, milestones, every_before=20):
    """The 1-based epochs at which the student is evaluated for model selection: as the B-MTARD reference
    (MTARD-extension resnet18_mtard_cifar10.py: epoch 1, every `every_before`-th epoch before the first lr milestone,
    every epoch from it on), and always the last epoch, so that the last model is a candidate too."""
    first_milestone = min(milestones, default=epochs)
    return tuple(e for e in range(1, epochs + 1)
                 if e == 1 or e % every_before == 0 or e >= first_milestone or e == epochs)


class ModelSelection(keras.callbacks.Callback):
    """Keeps the best model by (clean + PGD-TRADES-20)/2 on the selection split, at the epochs of select_epochs.

    The split is the test split (`best_test`, the reference's protocol, which makes the selected model's test
    figures optimistic) or the held-out end of the train split (`best_holdout`). Each evaluation's report is kept in
    `<directory>/epoch-<E>/`; the best model (the first of equals, as the reference's strict `>`) in
    `<directory>/best.keras`, the record in `<directory>/selection.json`. An epoch evaluated again after a resume
    computes the same figures and replaces its entry.
    """

    def __init__(self, network, config, directory):
        super().__init__()
        self.network = network
        self.config = config
        self.directory = directory
        self.best_path = os.path.join(directory, "best.keras")
        self.epochs = select_epochs(config.epochs, config.milestones, config.select_every_before)
        if config.select == "best_test":
            info = data.load_info(config.dataset, config.data_dir)
            self.split = info.test_split
            self.dataset = data.eval_dataset(config.dataset, config.data_dir, 250, config.select_examples)
        elif config.select == "best_holdout":
            self.split = f"train[-{config.holdout_examples}:] (held out)"
            self.dataset = data.holdout_dataset(config.dataset, config.data_dir, 250, config.holdout_examples,
                                                config.select_examples)
        else:
            raise ValueError(f"unknown --select={config.select}, expected one of {', '.join(SELECT_MODES)}")

    def record(self):
        path = os.path.join(self.directory, "selection.json")
        if not os.path.exists(path):
            return {"mode": self.config.select, "metric_name": SELECTION_METRIC, "split": self.split,
                    "epochs_evaluated": list(self.epochs), "epoch": None, "metric": None, "history": {}}
        with open(path) as f:
            return json.load(f)

    def on_epoch_end(self, epoch, logs=None):
        epoch += 1
        if epoch not in self.epochs:
            return
        report = evaluation.evaluate(self.network, self.dataset, attacks=("clean", "pgd_trades"),
                               epsilon=self.config.epsilon, num_examples=self.config.select_examples,
                               seed=self.config.seed, output_dir=os.path.join(self.directory, f"epoch-{epoch}"),
                               progress=False)
        metric = report["attacks"]["pgd_trades"]["w_robust"]
        record = self.record()
        record["history"][str(epoch)] = {"metric": metric, "clean": report["attacks"]["clean"]["accuracy"],
                                         "pgd_trades": report["attacks"]["pgd_trades"]["accuracy"]}
        record["num_examples"] = report["num_examples"]
        if record["epoch"] is None or metric > record["metric"] or record["epoch"] == epoch:
            save_model_atomic(self.network, self.best_path)
            record.update(epoch=epoch, metric=metric)
        files.write_json(os.path.join(self.directory, "selection.json"), record)
        print(f"\nselection: epoch {epoch}: {SELECTION_METRIC} = {100 * metric:.2f}% on {report['num_examples']} "
              f"{self.split} images; best: epoch {record['epoch']} ({100 * record['metric']:.2f}%)", flush=True)


def distill(config, strategy=None):
    """B-MTARD (or MTARD, per `config.balance`) distillation into `<model_dir>/student.keras`; (path, history)."""
    return train_student(config, config.balance, strategy)


def teacher_path(model_dir, kind):
    return os.path.join(model_dir, "teachers", f"{kind}.keras")


def train_teacher(config, kind, strategy=None):
    """Trains the clean (natural) or robust (TRADES / PGD-AT) teacher into `<model_dir>/teachers/<kind>.keras`.

    Returns (path, history). The per-epoch validation reports PGD-20 accuracy for the robust teacher only.
    """
    if kind not in ("clean", "robust"):
        raise ValueError(f"unknown teacher '{kind}', expected clean or robust")
    strategy = strategy or make_strategy()
    info, steps_per_epoch = _prepare(config, strategy)
    epochs = config.clean_teacher_epochs if kind == "clean" else config.robust_teacher_epochs
    schedule_name = config.clean_teacher_schedule if kind == "clean" else config.robust_teacher_schedule
    milestones = config.clean_teacher_milestones if kind == "clean" else config.robust_teacher_milestones
    if schedule_name == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(config.teacher_learning_rate,
                                                               epochs * steps_per_epoch)
    elif schedule_name == "step":
        learning_rate = MilestoneDecay(config.teacher_learning_rate, milestones, steps_per_epoch, config.decay)
    else:
        raise ValueError(f"unknown schedule '{schedule_name}', expected cosine or step")
    with strategy.scope():
        arch = config.clean_teacher_arch if kind == "clean" else config.robust_teacher_arch
        model = models.build_model(arch, info.num_classes, info.image_shape, sync_batchnorm=config.sync_batchnorm)
        if kind == "clean":
            trainer = teachers.NaturalTrainer(model, eval_attack_steps=0, **_attack_args(config))
        else:
            trainer = teachers.AdversarialTrainer(model, method=config.robust_method, trades_beta=config.trades_beta,
                                                  eval_attack_steps=config.eval_attack_steps, **_attack_args(config))
        _compile(trainer, config, strategy, learning_rate)
    path = teacher_path(config.model_dir, kind)
    history = fit_and_save(trainer, config, strategy, os.path.join(config.model_dir, "teachers", kind), epochs,
                           steps_per_epoch, path)
    return path, history
