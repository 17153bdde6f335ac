"""Repairs of Keras 3.15's TensorFlow trainer for MultiWorkerMirroredStrategy (found with TensorFlow 2.21).

They override private Keras methods, so they apply only where they are needed: `trainer.Trainer` mixes
`MultiWorkerRepairs` into a trainer constructed under a MultiWorkerMirroredStrategy (MirroredStrategy and the default
strategy work with Keras as it is). tests/test_keras_repairs.py fails if a Keras or TensorFlow upgrade renames or
changes what the overrides rely on; if it does, check whether the upgrade fixed the problem before adapting them.
"""

import functools

import tensorflow as tf


class MultiWorkerRepairs:
    """Mixed in before keras.Model: overrides of two methods of Keras' TensorFlow trainer
    (keras/src/backend/tensorflow/trainer.py)."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras builds the model from the first batch, which it averages over replicas with one strategy.reduce
        of the whole (images, labels) structure; MultiWorkerMirroredStrategy cannot reduce a structure.
        One replica's batch has the same shapes, and taking it needs no collective."""
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda value: self.distribute_strategy.experimental_local_results(value)[0], next(batches))
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _make_function(self, step_function):
        """Keras averages a step's outputs across workers with strategy.reduce("MEAN", axis=0), which fails on the
        scalar logs of train_step / test_step; they get an axis of length 1 that the reduction removes."""
        if self.distribute_strategy.extended._in_multi_worker_mode():  # the condition of Keras' reduce_per_replica
            scalar_step = step_function

            def step_function(data):
                return tf.nest.map_structure(lambda value: tf.reshape(value, [-1]) if value.shape.rank == 0 else value,
                                             scalar_step(data))
        return super()._make_function(step_function)


@functools.cache
def with_multi_worker_repairs(trainer_class):
    """`trainer_class` with MultiWorkerRepairs mixed in: one subclass per class, under the same name (Keras derives
    a model's default name, hence its variables' paths, from the class name)."""
    return type(trainer_class.__name__, (MultiWorkerRepairs, trainer_class), {"__module__": trainer_class.__module__})


def needs_multi_worker_repairs():
    """True under a MultiWorkerMirroredStrategy scope: the strategy Keras binds a model to when it is constructed."""
    return isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy)
