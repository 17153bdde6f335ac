"""The B-MTARD distiller: a keras.Model whose train_step is the paper's algorithm, as its reference code runs it
(zhaoshiji123/MTARD-extension resnet18_mtard_cifar10.py L104-172).

One training step, on a batch (x, y):
  1. x' = PGD on the student's cross-entropy (student in inference mode), from x + 0.001 N(0, I);
  2. p_a = softmax(T_a(x') / tau_a), p_n = softmax(T_n(x) / tau_n) from the frozen teachers;
  3. L_adv = KL(p_a, S(x')), L_nat = KL(p_n, S(x)) with the student in training mode;
  4. Normalization Loss Balance updates (w_adv, w_nat) from this step's losses, and L = w_adv L_adv + w_nat L_nat
     with the updated weights (as the reference does);
  5. an SGD step on the student only (coupled L2 weight decay, as PyTorch's SGD);
  6. Entropy-Based Balance updates (tau_a, tau_n) for the next step.
Statistics that drive the balancing rules are cross-replica means, so the state is the same on every replica.
"""

import tensorflow as tf

from mtard_tf.attacks import white_box
from mtard_tf.config import BalanceConfig
from mtard_tf.methods import balancing, losses
from mtard_tf.methods.trainer import global_mean, Trainer
from mtard_tf.models import loading

BALANCES = ("b_mtard", "mtard")


def _value_at(rate, step):
    """A float, or a schedule evaluated at the optimizer step."""
    return tf.cast(rate(step) if callable(rate) else rate, tf.float32)


class Distiller(Trainer):
    """Distils `student` from a clean teacher (on x) and a robust teacher (on the student's adversarial x').

    A keras.Model: `compile` it with an optimizer (SGD with momentum 0.9, as the paper) and `fit` it on (images,
    labels) batches; `distiller.student` is the trained network. The names follow keras.distillation.Distiller where
    the meaning is the same (student, compile, fit, .student); the teachers are two, `clean_teacher` and
    `robust_teacher`, frozen here. Every model maps images in [0, 1] to logits (a model ending in a softmax is
    refused: `strip_softmax`). One step is the paper's algorithm (this module's docstring); `fit` logs loss, kl_adv,
    kl_nat, weight_adv, weight_nat, temperature_adv, temperature_nat, entropy_adv, entropy_nat and learning_rate
    (`ScalarSummaries` writes them to TensorBoard), and validation data gives clean_accuracy and pgd_accuracy.

    Args:
      student: the keras.Model being trained (functional, Sequential or subclassed), images in [0, 1] -> logits.
      clean_teacher: the naturally trained teacher, applied to the clean images.
      robust_teacher: the adversarially trained teacher, applied to the student's adversarial images.
      balance: "b_mtard" (both balancing rules) or "mtard" (ECCV 2022: temperatures stay 1).
      kl_scale: multiplies both KL terms (10 in the CIFAR-100 reference code).
      weight_rate: eta_w of Normalization Loss Balance, a float or a schedule of the optimizer step.
      temperature_rate: eta_tau of Entropy-Based Balance, a float or a schedule of the optimizer step.
      temperature_min, temperature_max: the clip of the teacher temperatures.
      beta: power of the relative loss progress in the weight rule.
      **kwargs: the Trainer's: epsilon, attack_steps, attack_step_size, weight_decay, eval_attack_steps, seed.

    Example:

    >>> distiller = mtard_tf.Distiller(student, clean_teacher, robust_teacher, attack_steps=10)
    >>> distiller.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    >>> history = distiller.fit(train_dataset, epochs=2, validation_data=test_dataset)
    >>> distiller.student.save("student.keras")
    """

    def __init__(self, student, clean_teacher, robust_teacher, *, balance="b_mtard", kl_scale=BalanceConfig.kl_scale,
                 weight_rate=BalanceConfig.weight_rate, temperature_rate=BalanceConfig.temperature_rate,
                 temperature_min=BalanceConfig.temperature_min, temperature_max=BalanceConfig.temperature_max,
                 beta=BalanceConfig.beta, **kwargs):
        super().__init__(student, **kwargs)
        if balance not in BALANCES:
            raise ValueError(f"unknown balance '{balance}', expected one of {', '.join(BALANCES)}")
        self.clean_teacher = loading.check_logits(clean_teacher, "the clean teacher")
        self.robust_teacher = loading.check_logits(robust_teacher, "the robust teacher")
        for teacher in (clean_teacher, robust_teacher):
            teacher.trainable = False
        self.balance = balance
        self.kl_scale = float(kl_scale)
        self.weight_rate = weight_rate
        self.temperature_rate = temperature_rate
        self.temperature_min = float(temperature_min)
        self.temperature_max = float(temperature_max)
        self.beta = float(beta)
        self.temperature_adv = self.add_state("temperature_adv", 1.0)
        self.temperature_nat = self.add_state("temperature_nat", 1.0)
        self.weight_adv = self.add_state("weight_adv", 0.5)
        self.weight_nat = self.add_state("weight_nat", 0.5)
        self.initial_kl_adv = self.add_state("initial_kl_adv", 0.0)
        self.initial_kl_nat = self.add_state("initial_kl_nat", 0.0)
        self.initial_kl_set = self.add_state("initial_kl_set", 0.0)

    @property
    def student(self):
        """The network being trained (keras.distillation.Distiller's name for it)."""
        return self.model

    def update_loss_weights(self, kl_adv, kl_nat, step):
        """Normalization Loss Balance (resnet18_mtard_cifar10.py L137-166); the first step's losses become L(0)."""
        first = self.initial_kl_set < 0.5
        self.initial_kl_adv.assign(tf.where(first, kl_adv, self.initial_kl_adv))
        self.initial_kl_nat.assign(tf.where(first, kl_nat, self.initial_kl_nat))
        self.initial_kl_set.assign(1.0)
        weight_adv, weight_nat = balancing.loss_balance(
            self.weight_adv, self.weight_nat,
            balancing.relative_progress(kl_adv, self.initial_kl_adv, self.beta),
            balancing.relative_progress(kl_nat, self.initial_kl_nat, self.beta),
            _value_at(self.weight_rate, step))
        self.weight_adv.assign(weight_adv)
        self.weight_nat.assign(weight_nat)
        return weight_adv, weight_nat

    def update_temperatures(self, entropy_adv, entropy_nat, step):
        """Entropy-Based Balance (resnet18_mtard_cifar10.py L128-134); MTARD (ECCV 2022) keeps temperatures at 1."""
        if self.balance != "b_mtard":
            return
        temperature_adv, temperature_nat = balancing.entropy_balance(
            self.temperature_adv, self.temperature_nat, entropy_adv, entropy_nat,
            _value_at(self.temperature_rate, step), self.temperature_min, self.temperature_max)
        self.temperature_adv.assign(temperature_adv)
        self.temperature_nat.assign(temperature_nat)

    def adversarial_examples(self, images, labels):
        """x' = PGD on the student's CE (inference mode) from x + 0.001 N(0, I) (MTARD mtard_loss.py L27-53)."""
        return self.attack(self.cross_entropy_objective(labels), images,
                           white_box.normal_start(images, self.attack_noise(images)))

    def teacher_targets(self, images, images_adv, temperature_adv, temperature_nat):
        """p_a = softmax(T_a(x') / tau_a), p_n = softmax(T_n(x) / tau_n), teachers frozen in inference mode."""
        return (losses.teacher_probabilities(self.robust_teacher(images_adv, training=False), temperature_adv),
                losses.teacher_probabilities(self.clean_teacher(images, training=False), temperature_nat))

    def update_student(self, images, images_adv, probs_adv, probs_nat, step):
        """Distillation losses (student in training mode), loss weights from them, one SGD step on the student.

        Returns the cross-replica losses and the weights that computed this step's loss.
        """
        with tf.GradientTape() as tape:
            adv_logits = self.student(images_adv, training=True)
            logits = self.student(images, training=True)
            kl_adv = global_mean(tf.stop_gradient(losses.distillation_kl(adv_logits, probs_adv)))
            kl_nat = global_mean(tf.stop_gradient(losses.distillation_kl(logits, probs_nat)))
            weight_adv, weight_nat = self.update_loss_weights(kl_adv, kl_nat, step)
            per_example = losses.multi_teacher_loss(adv_logits, probs_adv, logits, probs_nat, weight_adv, weight_nat,
                                                    self.kl_scale)
        self.minimize(tape, per_example)
        return kl_adv, kl_nat, weight_adv, weight_nat

    def train_step(self, data):
        images, labels = self.unpack(data)
        step = tf.cast(self.optimizer.iterations, tf.int64)
        learning_rate = self.current_learning_rate()
        temperature_adv = tf.identity(self.temperature_adv)
        temperature_nat = tf.identity(self.temperature_nat)

        # The name scopes name the parts of the step in a profiler trace (profiling.STEP_PARTS).
        # 1. The student's adversarial examples.
        with tf.name_scope("attack"):
            images_adv = self.adversarial_examples(images, labels)
        # 2. Teacher probabilities at this step's temperatures.
        with tf.name_scope("teachers"):
            probs_adv, probs_nat = self.teacher_targets(images, images_adv, temperature_adv, temperature_nat)
        # 3-5. Losses, Normalization Loss Balance, and the student's update with the new weights.
        with tf.name_scope("student_update"):
            kl_adv, kl_nat, weight_adv, weight_nat = self.update_student(images, images_adv, probs_adv, probs_nat,
                                                                         step)
        # 6. Entropy-Based Balance: teacher temperatures for the next step.
        entropy_adv = global_mean(losses.teacher_entropy(probs_adv))
        entropy_nat = global_mean(losses.teacher_entropy(probs_nat))
        self.update_temperatures(entropy_adv, entropy_nat, step)

        return {"loss": self.kl_scale * (weight_adv * kl_adv + weight_nat * kl_nat),
                "kl_adv": kl_adv, "kl_nat": kl_nat, "weight_adv": weight_adv, "weight_nat": weight_nat,
                "temperature_adv": temperature_adv, "temperature_nat": temperature_nat,
                "entropy_adv": entropy_adv, "entropy_nat": entropy_nat, "learning_rate": learning_rate}
