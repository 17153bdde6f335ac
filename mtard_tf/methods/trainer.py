"""Base keras.Model for every adversarial training method: what a step needs besides the method's own loss.

A subclass writes `train_step` top to bottom like its paper's algorithm box, and uses:
  - `attack_noise` / `attack`: the training PGD (MTARD mtard/mtard_loss.py) with replica-independent random starts;
  - `minimize`: the SGD update of per-example losses, correctly scaled across replicas, with PyTorch-style
    (coupled) L2 weight decay;
  - the shared `test_step`: clean accuracy and, if `eval_attack_steps` > 0, PGD-SAT accuracy.
"""

import keras
import tensorflow as tf

from mtard_tf.attacks import white_box
from mtard_tf.config import AttackConfig, ScheduleConfig
from mtard_tf.methods import keras_repairs, losses
from mtard_tf.models import loading, pointwise_strides

# The step of the end-of-epoch validation's PGD: PGD-SAT's 2/255 (evaluation/robustness.py), whatever the training
# attack's step.
EVAL_STEP_SIZE = 2 / 255


def global_mean(per_example):
    """Mean of a per-example vector over the global batch (all replicas)."""
    replica = tf.distribute.get_replica_context()
    total = replica.all_reduce("sum", tf.reduce_sum(per_example))
    count = replica.all_reduce("sum", tf.cast(tf.size(per_example), tf.float32))
    return total / count


def replica_noise(sample, x, seed):
    """This replica's slice of noise drawn for the whole global batch from a stateless seed.

    Each example gets the same noise whatever the number of replicas, so 1 and N replicas compute the same step.
    """
    replica = tf.distribute.get_replica_context()
    replica_id = tf.cast(replica.replica_id_in_sync_group, tf.int32)
    batch = tf.shape(x)[0]
    shape = tf.concat([[batch * replica.num_replicas_in_sync], tf.shape(x)[1:]], axis=0)
    return sample(shape, seed)[replica_id * batch:(replica_id + 1) * batch]


def float_images(images):
    """Images as float32 in [0, 1]: integer pixels (uint8) are divided by 255, float images are cast as they are."""
    images = tf.convert_to_tensor(images)
    if images.dtype.is_integer:
        return tf.cast(images, tf.float32) / 255.0
    return tf.cast(images, tf.float32)


def standard_normal(shape, seed):
    return tf.random.stateless_normal(shape, seed)


def symmetric_uniform(shape, seed):
    return tf.random.stateless_uniform(shape, seed, -1.0, 1.0)


class Trainer(keras.Model):
    """Trains `model` (the network being learned); subclasses define train_step.

    The base of every method: a keras.Model whose `fit` trains `model` on (images, labels) batches (images float in
    [0, 1], or uint8, divided by 255) under the PGD attack set here, replica-correct under a
    tf.distribute.MirroredStrategy (construct and compile it inside the strategy's scope). `evaluate` / validation
    data give clean_accuracy and, with eval_attack_steps > 0, pgd_accuracy (PGD, uniform start, step 2/255).

    Args:
      model: the keras.Model being trained, images in [0, 1] -> logits (a final softmax is refused).
      epsilon: L-inf radius of the training attack, in [0, 1] pixel units.
      attack_steps, attack_step_size: the training PGD's steps and step size.
      weight_decay: coupled L2 weight decay, as PyTorch's SGD(weight_decay=...).
      eval_attack_steps: PGD steps of the validation attack (0: clean accuracy only).
      eval_step_size: its step size.
      seed: seed of the attacks' random starts (a function of seed and optimizer step).

    Example:

    >>> class MyTrainer(mtard_tf.Trainer):
    ...     def train_step(self, data):
    ...         images, labels = self.unpack(data)
    ...         with tf.GradientTape() as tape:
    ...             per_example = keras.losses.sparse_categorical_crossentropy(
    ...                 labels, self.model(images, training=True), from_logits=True)
    ...         self.minimize(tape, per_example)
    ...         return self.step_logs(self.current_learning_rate(), loss=per_example)
    """

    def __new__(cls, *args, **kwargs):
        """Constructed under a MultiWorkerMirroredStrategy, the trainer is an instance of `cls` with
        keras_repairs.MultiWorkerRepairs mixed in; under any other strategy, of `cls` itself."""
        if keras_repairs.needs_multi_worker_repairs() and not issubclass(cls, keras_repairs.MultiWorkerRepairs):
            cls = keras_repairs.with_multi_worker_repairs(cls)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, model, *, epsilon=AttackConfig.epsilon, attack_steps=AttackConfig.steps,
                 attack_step_size=AttackConfig.step_size, weight_decay=ScheduleConfig.weight_decay,
                 eval_attack_steps=AttackConfig.eval_steps, eval_step_size=EVAL_STEP_SIZE, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.model = loading.check_logits(model, "the student (the model being trained)")
        pointwise_strides.subsample_strided_pointwise_convs(self.model)  # a native crash in oneDNN, see its doc
        self.epsilon = float(epsilon)
        self.attack_steps = int(attack_steps)
        self.attack_step_size = float(attack_step_size)
        self.weight_decay = float(weight_decay)
        self.eval_attack_steps = int(eval_attack_steps)
        self.eval_step_size = float(eval_step_size)
        self.seed = int(seed)
        self.state_names = []
        self.clean_accuracy = keras.metrics.SparseCategoricalAccuracy(name="clean_accuracy")
        self.pgd_accuracy = keras.metrics.SparseCategoricalAccuracy(name="pgd_accuracy")
        # Batches of the current evaluation so far: Keras resets every tracker in `metrics` when an evaluation
        # starts, so the validation attack's random start is a function of (seed, optimizer step, batch) and nothing
        # a validation advances needs to be checkpointed (a run killed at any point resumes exactly).
        self.validation_batches = keras.metrics.Sum(name="validation_batches")

    @staticmethod
    def unpack(data):
        """(images float32 in [0, 1], labels) of an (images, labels) batch; uint8 images are divided by 255."""
        images, labels = data
        return float_images(images), labels

    def add_state(self, name, value):
        """A float32 scalar the step updates identically on every replica (checkpointed with the model)."""
        self.state_names.append(name)
        return self.add_weight(name=name, shape=(), initializer=keras.initializers.Constant(value), dtype="float32",
                               trainable=False, autocast=False, aggregation="only_first_replica")

    def state_variables(self):
        return {name: getattr(self, name) for name in self.state_names}

    @property
    def metrics(self):
        accuracies = [self.clean_accuracy, self.pgd_accuracy] if self.eval_attack_steps else [self.clean_accuracy]
        return accuracies + [self.validation_batches]

    def call(self, images, training=False):
        return self.model(float_images(images), training=training)

    def cross_entropy_objective(self, labels):
        """Cross-entropy of the model in inference mode: the objective of SAT-style PGD."""
        return lambda images: losses.cross_entropy(labels, self.model(images, training=False))

    def attack_noise(self, images, sample=standard_normal, stream=0):
        """Noise for this step's attack start, a function of (seed, stream, optimizer step) only."""
        seed = tf.stack([tf.cast(self.seed, tf.int64) * 1000 + stream, tf.cast(self.optimizer.iterations, tf.int64)])
        return replica_noise(sample, images, seed)

    def attack(self, objective, images, start):
        """The training attack: `attack_steps` PGD steps of size `attack_step_size` in the eps-ball."""
        return white_box.pgd(objective, images, start, epsilon=self.epsilon, step_size=self.attack_step_size,
                             steps=self.attack_steps)

    def minimize(self, tape, per_example_loss):
        """One optimizer step on `self.model` for the global-batch mean of `per_example_loss`, recorded on `tape`.

        The L2 term 0.5 * wd * |w|^2 gives the gradient wd * w that PyTorch's SGD(weight_decay=wd) adds; it is
        divided by the number of replicas because replica gradients are summed.
        """
        variables = self.model.trainable_variables
        with tape:
            replicas = tf.distribute.get_replica_context().num_replicas_in_sync
            global_batch = tf.shape(per_example_loss)[0] * replicas
            loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=global_batch)
            l2 = tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in variables])
            loss += tf.nn.scale_regularization_loss(0.5 * self.weight_decay * l2)
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))

    def current_learning_rate(self):
        return tf.cast(self.optimizer.learning_rate, tf.float32)

    @staticmethod
    def step_logs(learning_rate, **per_example_terms):
        """A train_step's logs: the global-batch mean of each per-example term, and the step's learning rate."""
        logs = {name: global_mean(tf.stop_gradient(term)) for name, term in per_example_terms.items()}
        logs["learning_rate"] = learning_rate
        return logs

    def test_step(self, data):
        """Clean accuracy, and PGD-SAT accuracy (uniform start, step 2/255, CE) when eval_attack_steps > 0."""
        images, labels = self.unpack(data)
        self.clean_accuracy.update_state(labels, self.model(images, training=False))
        if self.eval_attack_steps:
            seed = tf.random.experimental.stateless_fold_in(
                tf.stack([tf.cast(self.seed, tf.int64) * 1000 + 999, tf.cast(self.optimizer.iterations, tf.int64)]),
                tf.cast(self.validation_batches.result(), tf.int64))
            self.validation_batches.update_state(1.0)
            start = white_box.uniform_start(images, replica_noise(symmetric_uniform, images, seed), self.epsilon)
            images_adv = white_box.pgd(self.cross_entropy_objective(labels), images, start, epsilon=self.epsilon,
                                       step_size=self.eval_step_size, steps=self.eval_attack_steps)
            self.pgd_accuracy.update_state(labels, self.model(images_adv, training=False))
        return {metric.name: metric.result() for metric in self.metrics if metric is not self.validation_batches}
