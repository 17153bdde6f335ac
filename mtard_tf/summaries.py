"""TensorBoard scalars under exact tags: the balancing dynamics per step, validation accuracies per epoch."""

import keras
import tensorflow as tf

STEP_TAGS = ("loss", "kl_adv", "kl_nat", "weight_adv", "weight_nat", "temperature_adv", "temperature_nat",
             "entropy_adv", "entropy_nat", "learning_rate")
EPOCH_TAGS = ("clean_accuracy", "pgd_accuracy")


class ScalarSummaries(keras.callbacks.Callback):
    """Writes the train_step's per-step logs every `every_n_steps` optimizer steps, at step = optimizer.iterations.

    Keras' own TensorBoard callback prefixes tags with batch_/epoch_; these tags are the names users look for.
    Only the tags present in the logs are written, so other training modes can reuse the callback.
    """

    def __init__(self, log_dir, every_n_steps=1, step_tags=STEP_TAGS, epoch_tags=EPOCH_TAGS):
        super().__init__()
        self.log_dir = log_dir
        self.every_n_steps = max(1, int(every_n_steps))
        self.step_tags = step_tags
        self.epoch_tags = epoch_tags
        self.writer = None

    def on_train_begin(self, logs=None):
        self.writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every_n_steps or not logs:
            return
        with self.writer.as_default(step=step):
            for tag in self.step_tags:
                if tag in logs:
                    tf.summary.scalar(tag, logs[tag])

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        with self.writer.as_default(step=epoch + 1):
            for tag in self.epoch_tags:
                if f"val_{tag}" in logs:
                    tf.summary.scalar(tag, logs[f"val_{tag}"])
        self.writer.flush()

    def on_train_end(self, logs=None):
        self.writer.close()
