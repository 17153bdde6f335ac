"""Step decay at epoch milestones, shared by the learning rate and the two balancing rates (MTARD-extension
resnet18_mtard_cifar10.py: all three x0.1 after epochs 215, 260 and 285)."""

import keras
import tensorflow as tf

from mtard_tf.config import ScheduleConfig


@keras.saving.register_keras_serializable(package="mtard_tf")
class MilestoneDecay(keras.optimizers.schedules.LearningRateSchedule):
    """value(step) = initial_value * decay ** (number of milestones <= step // steps_per_epoch)."""

    def __init__(self, initial_value, milestones, steps_per_epoch, decay=ScheduleConfig.decay):
        self.initial_value = float(initial_value)
        self.milestones = [int(m) for m in milestones]
        self.steps_per_epoch = int(steps_per_epoch)
        self.decay = float(decay)

    def __call__(self, step):
        epoch = tf.cast(step, tf.int64) // self.steps_per_epoch
        milestones = tf.constant(self.milestones, tf.int64, shape=[len(self.milestones)])
        passed = tf.reduce_sum(tf.cast(epoch >= milestones, tf.float32))
        return self.initial_value * tf.pow(self.decay, passed)

    def get_config(self):
        return {"initial_value": self.initial_value, "milestones": self.milestones,
                "steps_per_epoch": self.steps_per_epoch, "decay": self.decay}
