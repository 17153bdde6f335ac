"""Training runs of the student and the teachers: the trainer of the method, fit with checkpoints, TensorBoard and
model selection, and the saved model with its summary."""

import json
import os
import shutil

import keras

from mtard_tf import files
from mtard_tf.config import ConfigError, EvalConfig, SelectionConfig
from mtard_tf.data import datasets
from mtard_tf.evaluation import robustness
from mtard_tf.job import checkpointing, distribute, profiling, summaries, wall_time
from mtard_tf.methods import registry
from mtard_tf.methods.schedules import MilestoneDecay
from mtard_tf.models import architectures, loading


def train_source(config):
    """"memory" or "disk": where this run reads the train split (datasets.train_source of --train_source)."""
    return datasets.train_source(config.data.source, config.data.data_dir, config.data.train_source,
                                 config.data.in_memory_limit_gb)


def fit(trainer, config, work_dir, epochs, steps_per_epoch, strategy, callbacks=()):
    """model.fit for `epochs` x `steps_per_epoch` steps, resumable at any step, with everything under `work_dir`.

    Checkpoints (`checkpoints/`, every epoch and every `config.runtime.checkpoint_every_n_steps`) hold the model, the
    optimizer and the trainer's state; the data stream restarts at the restored step, so a resumed run computes what
    an uninterrupted one does. A resumed partial epoch is finished by its own fit call. TensorBoard scalars go to
    `tensorboard/`. With `config.runtime.profile_dir`, step `profile_step` of this call is traced into
    `<profile_dir>/student` (`work_dir` = the model directory) or `<profile_dir>/<work_dir relative to it>`.
    Returns a keras History with the merged per-epoch logs of this call, and as its `train_seconds` the training
    wall time of all the sittings of a resumed run (StepCheckpoints.train_seconds).
    """
    output_dir = distribute.writable_dir(strategy, work_dir)
    checkpoints = checkpointing.StepCheckpoints(trainer, os.path.join(work_dir, "checkpoints"),
                                                os.path.join(output_dir, "checkpoints"))
    step = checkpoints.restore_latest()
    total = epochs * steps_per_epoch
    if step:
        print(f"resuming from step {step} of {total} ({checkpoints.latest()})")
    batch_size, validation_steps = config.schedule.batch_size, config.schedule.validation_steps
    source = train_source(config)
    if source == "disk":
        print(f"train split of '{config.data.dataset}': read from disk by index (its ArrayRecord files), not held in "
              f"memory")
    validation = datasets.eval_dataset(config.data.source, config.data.data_dir, batch_size)
    run = os.path.relpath(work_dir, config.runtime.model_dir)
    stage = f"student ({config.method})" if run == os.curdir else f"{os.path.basename(work_dir)} teacher"
    callbacks = [
        wall_time.WallTimeEstimate(stage, step, total, accelerator=distribute.has_accelerator()),
        checkpointing.NonFiniteLossGuard(checkpoints.directory),
        summaries.ScalarSummaries(os.path.join(output_dir, "tensorboard"), config.runtime.log_every_n_steps),
        *callbacks,  # after validation, before the epoch's checkpoint
        checkpointing.CheckpointCallback(checkpoints, config.runtime.checkpoint_every_n_steps),
    ]
    if config.runtime.profile_dir:
        logdir = os.path.join(config.runtime.profile_dir, "student" if run == os.curdir else run)
        # First: its trace starts right before the step and stops right after it, without the other callbacks.
        callbacks.insert(0, profiling.ProfileStep(distribute.writable_dir(strategy, logdir),
                                                  config.runtime.profile_step))
    history = keras.callbacks.History()
    history.history = {}
    while step < total:
        epoch, done = divmod(step, steps_per_epoch)
        train = datasets.train_dataset(config.data.source, config.data.data_dir, batch_size, seed=config.runtime.seed,
                                       start_step=step, holdout=config.selection.held_out(), source=source)
        result = trainer.fit(train, initial_epoch=epoch, epochs=epoch + 1 if done else epochs,
                             steps_per_epoch=steps_per_epoch - done, validation_data=validation,
                             validation_steps=validation_steps, callbacks=callbacks, verbose=config.runtime.verbose,
                             shuffle=False)
        for key, values in result.history.items():
            history.history.setdefault(key, []).extend(values)
        step = checkpoints.step()
    if not history.history:  # finished before an interruption: the final validation is re-measured
        metrics = trainer.evaluate(validation, steps=validation_steps, verbose=0, return_dict=True)
        history.history = {f"val_{name}": [value] for name, value in metrics.items()}
    history.train_seconds = checkpoints.train_seconds()
    return history


def fit_and_save(trainer, config, strategy, work_dir, epochs, steps_per_epoch, path, callbacks=(), **summary):
    """fit, then the trained model to `path` (.keras) and a summary to the .json beside it: the last validation
    accuracies, the training wall time, the trainer's state, the run's configuration and `summary`. Returns the fit
    history.

    On a multi-worker run every worker saves (into its writable_dir) and waits until all have: the chief's files are
    complete when this returns on any worker.
    """
    history = fit(trainer, config, work_dir, epochs, steps_per_epoch, strategy, callbacks)
    output = os.path.join(distribute.writable_dir(strategy, os.path.dirname(path)), os.path.basename(path))
    files.save_model(trainer.model, output)
    files.write_json(os.path.splitext(output)[0] + ".json",
                     {**final_metrics(history), **summary, "train_seconds": round(history.train_seconds, 1),
                      "state": {name: float(v.numpy()) for name, v in trainer.state_variables().items()},
                      "config": config.to_dict()})
    distribute.barrier(strategy)
    return history


def _prepare(config, strategy):
    """(dataset info, steps per epoch), with the global random seed set."""
    batch_size = config.schedule.batch_size
    if batch_size % strategy.num_replicas_in_sync:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {strategy.num_replicas_in_sync} replicas")
    keras.utils.set_random_seed(config.runtime.seed)
    info = datasets.load_info(config.data.source, config.data.data_dir)
    return info, steps_per_epoch(config, info)


def steps_per_epoch(config, info):
    """--steps_per_epoch, else one pass over the train split (less the holdout) in whole batches."""
    return (config.schedule.steps_per_epoch
            or (info.num_train - config.selection.held_out()) // config.schedule.batch_size)


def _build_trainer(config, strategy, method, network, frozen, learning_rate, schedule, eval_attack_steps):
    """The method's trainer of `network` (registry.METHODS), compiled with SGD at `learning_rate`."""
    trainer = registry.get_method(method).build(network, frozen, config, schedule,
                                                **registry.trainer_arguments(config, eval_attack_steps))
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=config.schedule.momentum),
                    jit_compile=distribute.use_xla(strategy, config.runtime.jit_compile))
    return trainer


def final_metrics(history):
    """The last epoch's validation accuracies, e.g. {"clean_accuracy": 0.9, "pgd_accuracy": 0.5}."""
    return {key[len("val_"):]: float(values[-1]) for key, values in history.history.items()
            if key.startswith("val_")}


def train_student(config, strategy):
    """Trains the student with `config.method` (registry.METHODS) into `<model_dir>/student.keras`; returns
    (path, history).

    Every method gets the same architecture, initialisation (seed), data order, optimizer, schedule (lr x decay at
    the milestones) and attack budget; it loads only the teachers it uses. `<model_dir>/student.json` holds the last
    validation accuracies, the method, the training wall time and the configuration (the recipe an export's model
    card states: a later --mode=export rewrites <model_dir>/config.json with its own flags).
    """
    method = config.method
    model_dir = config.runtime.model_dir
    info, steps_per_epoch = _prepare(config, strategy)
    for kind in registry.get_method(method).teachers:
        if not config.teacher(kind).file:
            raise loading.TeacherError(f"method '{method}' needs a {kind} teacher file (--{kind}_teacher)")
    with strategy.scope():
        frozen = {kind: loading.load_teacher(config.teacher(kind).file, info.image_shape, info.num_classes,
                                             config.strip_softmax)
                  for kind in registry.get_method(method).teachers}
        student = architectures.build_model(config.student, info.num_classes, info.image_shape,
                                            sync_batchnorm=config.runtime.sync_batchnorm)

        def schedule(value):
            return MilestoneDecay(value, config.schedule.milestones, steps_per_epoch, config.schedule.decay)

        trainer = _build_trainer(config, strategy, method, student, frozen, schedule(config.schedule.learning_rate),
                                 schedule, config.attack.eval_steps)
    path = os.path.join(model_dir, "student.keras")
    epochs = config.schedule.epochs
    if config.selection.select == "last":
        history = fit_and_save(trainer, config, strategy, model_dir, epochs, steps_per_epoch, path,
                               method=method, selection={"mode": "last", "epoch": epochs})
        return path, history
    selection = ModelSelection(trainer.model, config, os.path.join(distribute.writable_dir(strategy, model_dir),
                                                                   "selection"))
    last_path = os.path.join(model_dir, "student_last.keras")
    history = fit_and_save(trainer, config, strategy, model_dir, epochs, steps_per_epoch, last_path,
                           callbacks=[selection], method=method)
    if distribute.is_chief(strategy):
        with open(os.path.splitext(last_path)[0] + ".json") as f:
            last = json.load(f)
        record = selection.record()
        files.write_json(os.path.splitext(path)[0] + ".json",
                         {"method": method, "train_seconds": last["train_seconds"], "state": last["state"],
                          "config": last["config"],
                          "selection": {key: value for key, value in record.items() if key != "history"},
                          "selection_history": record["history"], "last": {"path": last_path, **final_metrics(history)}})
        with files.atomic_path(path) as temporary:  # the selected model's file as it is, not loaded and re-saved
            shutil.copyfile(selection.best_path, temporary)
    distribute.barrier(strategy)
    return path, history


SELECTION_METRIC = "(clean + PGD-TRADES-20) / 2"


def select_epochs(epochs, milestones, every_before=SelectionConfig.every_before):
    """The 1-based epochs at which the student is evaluated for model selection: as the B-MTARD reference
    (MTARD-extension resnet18_mtard_cifar10.py: epoch 1, every `every_before`-th epoch before the first lr milestone,
    every epoch from it on), and always the last epoch, so that the last model is a candidate too."""
    first_milestone = min(milestones, default=epochs)
    return tuple(e for e in range(1, epochs + 1)
                 if e == 1 or e % every_before == 0 or e >= first_milestone or e == epochs)


class ModelSelection(keras.callbacks.Callback):
    """Keeps the best model by (clean + PGD-TRADES-20)/2 on the selection split, at the epochs of select_epochs,
    in batches of the evaluation's default batch size (config.EvalConfig; --eval_batch_size does not apply).

    The split is the test split (`best_test`, the reference's protocol, which makes the selected model's test
    figures optimistic) or the held-out end of the train split (`best_holdout`). Each evaluation's report is kept in
    `<directory>/epoch-<E>/`; the best model (the first of equals, as the reference's strict `>`) in
    `<directory>/best.keras`, the record in `<directory>/selection.json`. An epoch evaluated again after a resume
    computes the same figures and replaces its entry.
    """

    def __init__(self, network, config, directory):
        super().__init__()
        self.network = network
        self.selection = config.selection
        self.epsilon = config.attack.epsilon
        self.seed = config.runtime.seed
        self.directory = directory
        self.best_path = os.path.join(directory, "best.keras")
        self.epochs = select_epochs(config.schedule.epochs, config.schedule.milestones, self.selection.every_before)
        dataset, data_dir = config.data.source, config.data.data_dir
        if self.selection.select == "best_test":
            self.split = datasets.load_info(dataset, data_dir).test_split
            self.dataset = datasets.eval_dataset(dataset, data_dir, EvalConfig.batch_size, self.selection.examples)
        else:
            self.split = f"train[-{self.selection.holdout_examples}:] (held out)"
            self.dataset = datasets.holdout_dataset(dataset, data_dir, EvalConfig.batch_size,
                                                    self.selection.holdout_examples, self.selection.examples,
                                                    source=train_source(config))

    def record(self):
        path = os.path.join(self.directory, "selection.json")
        if not os.path.exists(path):
            return {"mode": self.selection.select, "metric_name": SELECTION_METRIC, "split": self.split,
                    "epochs_evaluated": list(self.epochs), "epoch": None, "metric": None, "history": {}}
        with open(path) as f:
            return json.load(f)

    def on_epoch_end(self, epoch, logs=None):
        epoch += 1
        if epoch not in self.epochs:
            return
        report = robustness.evaluate(self.network, self.dataset, attacks=("clean", "pgd_trades"),
                                     epsilon=self.epsilon, num_examples=self.selection.examples, seed=self.seed,
                                     output_dir=os.path.join(self.directory, f"epoch-{epoch}"), progress=False)
        metric = report["attacks"]["pgd_trades"]["w_robust"]
        record = self.record()
        record["history"][str(epoch)] = {"metric": metric, "clean": report["attacks"]["clean"]["accuracy"],
                                         "pgd_trades": report["attacks"]["pgd_trades"]["accuracy"]}
        record["num_examples"] = report["num_examples"]
        if record["epoch"] is None or metric > record["metric"] or record["epoch"] == epoch:
            files.save_model(self.network, self.best_path)
            record.update(epoch=epoch, metric=metric)
        files.write_json(os.path.join(self.directory, "selection.json"), record)
        print(f"\nselection: epoch {epoch}: {SELECTION_METRIC} = {100 * metric:.2f}% on {report['num_examples']} "
              f"{self.split} images; best: epoch {record['epoch']} ({100 * record['metric']:.2f}%)", flush=True)


def teacher_path(model_dir, kind):
    return os.path.join(model_dir, "teachers", f"{kind}.keras")


def train_teacher(config, kind, strategy):
    """Trains the clean or the robust teacher (`config.teacher(kind)`: natural, TRADES or PGD-AT training) into
    `<model_dir>/teachers/<kind>.keras`. Returns (path, history). The per-epoch validation reports PGD-20 accuracy
    unless the teacher is trained naturally.
    """
    teacher = config.teacher(kind)
    info, steps_per_epoch = _prepare(config, strategy)
    if teacher.schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(teacher.learning_rate, teacher.epochs * steps_per_epoch)
    else:
        learning_rate = MilestoneDecay(teacher.learning_rate, teacher.milestones, steps_per_epoch,
                                       config.schedule.decay)
    with strategy.scope():
        model = architectures.build_model(teacher.arch, info.num_classes, info.image_shape,
                                          sync_batchnorm=config.runtime.sync_batchnorm)
        eval_attack_steps = 0 if teacher.method == "natural" else config.attack.eval_steps
        trainer = _build_trainer(config, strategy, registry.TEACHER_TRAINING[teacher.method], model, {},
                                 learning_rate, None, eval_attack_steps)
    model_dir = config.runtime.model_dir
    path = teacher_path(model_dir, kind)
    history = fit_and_save(trainer, config, strategy, os.path.join(model_dir, "teachers", kind), teacher.epochs,
                           steps_per_epoch, path)
    return path, history
