"""Teachers: loading and checking .keras teachers, and the trainers that make them (natural and adversarial).

Any Keras model mapping the dataset's [0, 1] images to C logits is a valid teacher.
"""

import os
import zipfile

import keras
import tensorflow as tf

from mtard_tf import attacks, losses
from mtard_tf.trainer import Trainer, symmetric_uniform


class TeacherError(ValueError):
    """A teacher file that is missing, unreadable or does not fit the dataset."""


def load_teacher(path, image_shape, num_classes):
    """Loads a frozen teacher from a .keras file and checks its input shape and number of classes."""
    if not path:
        raise TeacherError("no teacher file given")
    if not os.path.isfile(path):
        raise TeacherError(f"teacher file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise TeacherError(f"teacher file {path} is not a Keras model (.keras zip archive); it may be truncated")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a broken archive; all mean the same to the user.
        raise TeacherError(f"teacher file {path} could not be loaded as a Keras model: {error}") from error
    check_model_fits(model, image_shape, num_classes, what=f"teacher {path}")
    model.trainable = False
    return model


def check_model_fits(model, image_shape, num_classes, what="model"):
    """Raises TeacherError unless `model` maps [B, *image_shape] images to [B, num_classes] logits."""
    input_shape = tuple(model.input_shape[1:]) if hasattr(model, "input_shape") else None
    if input_shape != tuple(image_shape):
        raise TeacherError(f"{what} expects input images of shape {input_shape}, but the dataset's images are "
                           f"{tuple(image_shape)}")
    output_shape = tuple(model.output_shape[1:])
    if output_shape != (num_classes,):
        raise TeacherError(f"{what} outputs shape {output_shape}, but the dataset has {num_classes} classes "
                           f"(expected ({num_classes},) logits)")


class NaturalTrainer(Trainer):
    """Natural training (the clean teacher, and the `natural` baseline): minimise CE(f(x), y)."""

    def train_step(self, data):
        images, labels = data
        learning_rate = self.current_learning_rate()
        with tf.GradientTape() as tape:
            per_example = losses.natural_loss(labels, self.model(images, training=True))
        self.minimize(tape, per_example)
        return self.step_logs(learning_rate, loss=per_example)


class AdversarialTrainer(Trainer):
    """Adversarial training of the robust teacher, and the `sat` / `trades` baselines.

    pgd_at (SAT, Madry et al.): CE(f(x'), y), x' = PGD on CE from a uniform random start.
    trades (Zhang et al.):      CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximises that KL from x + 0.001 N(0, I).
    """

    METHODS = ("trades", "pgd_at")

    def __init__(self, model, *, method="trades", trades_beta=6.0, **kwargs):
        super().__init__(model, **kwargs)
        if method not in self.METHODS:
            raise ValueError(f"unknown robust method '{method}', expected one of {', '.join(self.METHODS)}")
        self.method = method
        self.trades_beta = float(trades_beta)

    def train_step(self, data):
        images, labels = data
        images = tf.cast(images, tf.float32)
        learning_rate = self.current_learning_rate()
        if self.method == "pgd_at":
            start = attacks.uniform_start(images, self.attack_noise(images, symmetric_uniform), self.epsilon)
            images_adv = self.attack(self.cross_entropy_objective(labels), images, start)
            with tf.GradientTape() as tape:
                per_example = losses.sat_loss(labels, self.model(images_adv, training=True))
            self.minimize(tape, per_example)
            return self.step_logs(learning_rate, loss=per_example)

        clean_logits = tf.stop_gradient(self.model(images, training=False))
        images_adv = self.attack(lambda x: losses.kl_divergence(clean_logits, self.model(x, training=False)),
                                 images, attacks.normal_start(images, self.attack_noise(images)))
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            adv_logits = self.model(images_adv, training=True)
            per_example = losses.trades_loss(labels, logits, adv_logits, self.trades_beta)
        self.minimize(tape, per_example)
        natural = losses.cross_entropy(labels, logits)
        robust = losses.kl_divergence(logits, adv_logits)
        return self.step_logs(learning_rate, loss=per_example, cross_entropy=natural, kl_robust=robust)
