"""TensorBoard scalars under exact tags: a trainer's per-step logs, validation accuracies per epoch."""

import keras
import tensorflow as tf


class ScalarSummaries(keras.callbacks.Callback):
    """Writes every value of the train_step's logs every `every_n_steps` steps (step = optimizer.iterations), and
    the validation logs at each epoch end (step = epoch number), under the logs' own names.

    Keras' TensorBoard callback prefixes tags with batch_/epoch_; these are the names users look for. The command
    writes its curves with this callback, so a Distiller fit from Python gives the same tags: loss, kl_adv, kl_nat,
    weight_adv, weight_nat, temperature_adv, temperature_nat, entropy_adv, entropy_nat, learning_rate.

    Args:
      log_dir: the TensorBoard log directory.
      every_n_steps: write the step logs every N optimizer steps.

    Example:

    >>> distiller.fit(dataset, epochs=1, callbacks=[mtard_tf.ScalarSummaries("logs/distill")])
    """

    def __init__(self, log_dir, every_n_steps=1):
        super().__init__()
        self.log_dir = log_dir
        self.every_n_steps = max(1, int(every_n_steps))
        self.writer = None

    def on_train_begin(self, logs=None):
        self.writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every_n_steps or not logs:
            return
        with self.writer.as_default(step=step):
            for tag, value in logs.items():
                tf.summary.scalar(tag, value)

    def on_epoch_end(self, epoch, logs=None):
        with self.writer.as_default(step=epoch + 1):
            for tag, value in (logs or {}).items():
                if tag.startswith("val_"):
                    tf.summary.scalar(tag[len("val_"):], value)
        self.writer.flush()

    def on_train_end(self, logs=None):
        self.writer.close()
