"""Distillation runs: the strategy, the optimizer and schedules, fit with callbacks, and the saved student."""

import dataclasses
import os

import keras
import tensorflow as tf

from mtard_tf import data, models, summaries, teachers
from mtard_tf.distiller import Distiller
from mtard_tf.schedules import MilestoneDecay


def set_cpu_replicas(num_replicas):
    """Splits the CPU into `num_replicas` logical devices; must run before TensorFlow initialises its devices."""
    if num_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_replicas)])


def make_strategy():
    """MirroredStrategy over every visible GPU, else over every logical CPU device."""
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def save_model_atomic(model, path):
    """model.save to a temporary .keras name in the same directory, then rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".partial-{os.getpid()}-{os.path.basename(path)}")
    try:
        model.save(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


@dataclasses.dataclass
class DistillConfig:
    """Everything a distillation run needs; defaults are the paper's CIFAR setting (SPEC 1.5)."""
    dataset: str = "cifar10"
    data_dir: str | None = None
    student: str = "resnet18"
    clean_teacher: str = ""
    robust_teacher: str = ""
    model_dir: str = "runs/cifar10"
    epochs: int = 300
    steps_per_epoch: int | None = None
    batch_size: int = 128
    validation_steps: int | None = None
    log_every_n_steps: int = 1
    seed: int = 0
    balance: str = "b_mtard"
    epsilon: float = 8 / 255
    attack_steps: int = 10
    attack_step_size: float = 2 / 255
    eval_attack_steps: int = 20
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    milestones: tuple = (215, 260, 285)
    decay: float = 0.1
    weight_rate: float = 0.025
    temperature_rate: float = 0.001
    temperature_min: float = 1.0
    temperature_max: float = 10.0
    beta: float = 1.0
    kl_scale: float = 1.0
    jit_compile: bool | None = None  # None: on with a single replica, off under several (SPEC 4)
    sync_batchnorm: bool = False
    verbose: int = 1


def build_distiller(config, strategy, info, clean_teacher, robust_teacher, steps_per_epoch):
    """Student, distiller and optimizer, created under the strategy's scope."""
    def schedule(value):
        return MilestoneDecay(value, config.milestones, steps_per_epoch, config.decay)

    with strategy.scope():
        student = models.build_model(config.student, info.num_classes, info.image_shape,
                                     sync_batchnorm=config.sync_batchnorm)
        distiller = Distiller(
            student, clean_teacher, robust_teacher, balance=config.balance, epsilon=config.epsilon,
            attack_steps=config.attack_steps, attack_step_size=config.attack_step_size, kl_scale=config.kl_scale,
            weight_rate=schedule(config.weight_rate), temperature_rate=schedule(config.temperature_rate),
            temperature_min=config.temperature_min, temperature_max=config.temperature_max, beta=config.beta,
            weight_decay=config.weight_decay, eval_attack_steps=config.eval_attack_steps, seed=config.seed)
        jit_compile = (strategy.num_replicas_in_sync == 1) if config.jit_compile is None else config.jit_compile
        distiller.compile(optimizer=keras.optimizers.SGD(schedule(config.learning_rate), momentum=config.momentum),
                          jit_compile=jit_compile)
    return distiller


def distill(config, strategy=None):
    """Runs B-MTARD distillation and saves `<model_dir>/student.keras`; returns (path, history)."""
    strategy = strategy or make_strategy()
    if config.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"batch size {config.batch_size} is not divisible by the "
                         f"{strategy.num_replicas_in_sync} replicas")
    keras.utils.set_random_seed(config.seed)
    info = data.load_info(config.dataset, config.data_dir)
    steps_per_epoch = config.steps_per_epoch or info.num_train // config.batch_size
    with strategy.scope():
        clean_teacher = teachers.load_teacher(config.clean_teacher, info.image_shape, info.num_classes)
        robust_teacher = teachers.load_teacher(config.robust_teacher, info.image_shape, info.num_classes)
    distiller = build_distiller(config, strategy, info, clean_teacher, robust_teacher, steps_per_epoch)
    train = data.train_dataset(config.dataset, config.data_dir, config.batch_size, seed=config.seed)
    validation = data.eval_dataset(config.dataset, config.data_dir, config.batch_size)
    callbacks = [
        summaries.ScalarSummaries(os.path.join(config.model_dir, "tensorboard"), config.log_every_n_steps),
        keras.callbacks.BackupAndRestore(os.path.join(config.model_dir, "backup"), save_freq="epoch"),
    ]
    history = distiller.fit(train, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                            validation_data=validation, validation_steps=config.validation_steps,
                            callbacks=callbacks, verbose=config.verbose, shuffle=False)
    path = save_model_atomic(distiller.student, os.path.join(config.model_dir, "student.keras"))
    return path, history
