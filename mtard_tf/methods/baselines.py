"""The trainers of natural and adversarial training (which also make the teachers) and of the single-teacher
distillation baselines of the paper's comparison tables (registry.py maps each `--method` to its trainer).

The reference code of each loss: natural boyellow/AdaAD main.py L302-304 (`Plain_Clean`); sat
MadryLab/cifar10_challenge model.py L94-97; trades yaodongyu/TRADES trades.py L79-83; ard
goldblum/AdversariallyRobustDistillation main.py L127; rslad zibojia/RSLAD resnet18_rslad_cifar10.py L59-63; adaad
boyellow/AdaAD main.py L341-353; mtard zhaoshiji123/MTARD mtard/mtard_resnet18_cifar10.py L77-100; b_mtard
zhaoshiji123/MTARD-extension resnet18_mtard_cifar10.py L122-169.

Every trainer shares trainer.Trainer's attack (PGD in the eps-ball, replica-independent random starts), its
replica-correct SGD step and its validation; only the loss and the attack objective differ. Each method's official
training recipe (epochs, milestones, weight decay, attack, loss hyper-parameters) is flags/methods/<method>.cfg.
The three baselines below follow their authors' PyTorch code where the papers leave a choice open:

- ARD (Goldblum et al., AAAI 2020; github goldblum/AdversariallyRobustDistillation): x' = PGD on the student's CE
  from a uniform random start in the eps-ball; loss alpha * tau^2 * KL(T(x)/tau || S(x')/tau) + (1 - alpha) * CE(S(x))
  with `nn.KLDivLoss()`'s reduction, a mean over batch x classes (KL / C; main.py L113, L127); teacher on the *clean*
  image; both student passes in training mode, S(x') first (main.py L124-126). Deviation: the reference attacks the
  student in training mode (BatchNorm on batch statistics, main.py L118); here, as in every other method, the attack
  runs in inference mode.
- RSLAD (Zi et al., ICCV 2021; github zibojia/RSLAD): x' maximises KL(T(x) || S(x')) (student in inference mode)
  from x + 0.001 N(0, I) (rslad_loss.py L26-51); loss w * l(S(x'), T(x)) + (1 - w) * l(S(x), T(x)) with the
  reference's l = mean over batch x classes of p (log(p + 1e-5) - log softmax(z)), i.e. losses.distillation_kl,
  w = 5/6 (resnet18_rslad_cifar10.py L38-40, L59-63).
- AdaAD (Huang et al., CVPR 2023; github boyellow/AdaAD): x' maximises KL(T(x') || S(x')) through both networks
  (both in inference mode) from x + 0.001 N(0, I) (AT_helper.py L8-48); loss alpha * KL(T(x') || S(x'))
  + (1 - alpha) * KL(T(x) || S(x)); student passes in training mode, S(x) first (main.py L330-339). The reduction
  is the reference's own, which differs by dataset (losses.adaad_kl): on CIFAR-10 `nn.KLDivLoss()`, a mean over
  batch x classes, i.e. KL / C (main.py L341-345); on CIFAR-100 the KL summed over batch x classes and divided by
  the batch size, i.e. the full KL (main.py L347-351).

`kl_scale` (10 in the CIFAR-100 preset) multiplies the KL / C terms of RSLAD, MTARD and B-MTARD, as their code does
on CIFAR-100 (zibojia/RSLAD resnet18_rslad_cifar100.py L63-65, zhaoshiji123/MTARD mtard/mtard_resnet18_cifar100.py
L79-80). It does not apply to AdaAD, whose code has no such factor: its CIFAR-100 loss is the full KL instead.
"""

import tensorflow as tf

from mtard_tf.attacks import white_box
from mtard_tf.config import BalanceConfig, BaselineConfig
from mtard_tf.methods import losses
from mtard_tf.methods.trainer import symmetric_uniform, Trainer
from mtard_tf.models import loading


class NaturalTrainer(Trainer):
    """Natural training (the clean teacher, and the `natural` baseline): minimise CE(f(x), y).

    Args:
      model: the keras.Model being trained (images in [0, 1] -> logits).
      **kwargs: the Trainer's (weight_decay, eval_attack_steps, seed, ...).

    Example:

    >>> trainer = mtard_tf.NaturalTrainer(model)
    >>> trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    >>> trainer.fit(train_dataset, epochs=1)
    """

    def train_step(self, data):
        images, labels = self.unpack(data)
        learning_rate = self.current_learning_rate()
        with tf.GradientTape() as tape:
            per_example = losses.natural_loss(labels, self.model(images, training=True))
        self.minimize(tape, per_example)
        return self.step_logs(learning_rate, loss=per_example)


class AdversarialTrainer(Trainer):
    """Adversarial training of the robust teacher, and the `sat` / `trades` baselines.

    pgd_at (SAT, Madry et al.): CE(f(x'), y), x' = PGD on CE from a uniform random start.
    trades (Zhang et al.):      CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximises that KL from x + 0.001 N(0, I).

    Args:
      model: the keras.Model being trained (images in [0, 1] -> logits).
      method: "trades" or "pgd_at".
      trades_beta: TRADES' beta.
      **kwargs: the Trainer's (epsilon, attack_steps, attack_step_size, weight_decay, eval_attack_steps, seed).

    Example:

    >>> trainer = mtard_tf.AdversarialTrainer(model, method="trades")
    >>> trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    >>> trainer.fit(train_dataset, epochs=1)
    """

    METHODS = ("trades", "pgd_at")

    def __init__(self, model, *, method="trades", trades_beta=BaselineConfig.trades_beta, **kwargs):
        super().__init__(model, **kwargs)
        if method not in self.METHODS:
            raise ValueError(f"unknown robust method '{method}', expected one of {', '.join(self.METHODS)}")
        self.method = method
        self.trades_beta = float(trades_beta)

    def train_step(self, data):
        images, labels = self.unpack(data)
        learning_rate = self.current_learning_rate()
        if self.method == "pgd_at":
            start = white_box.uniform_start(images, self.attack_noise(images, symmetric_uniform), self.epsilon)
            images_adv = self.attack(self.cross_entropy_objective(labels), images, start)
            with tf.GradientTape() as tape:
                per_example = losses.sat_loss(labels, self.model(images_adv, training=True))
            self.minimize(tape, per_example)
            return self.step_logs(learning_rate, loss=per_example)

        clean_logits = tf.stop_gradient(self.model(images, training=False))
        images_adv = self.attack(lambda x: losses.kl_divergence(clean_logits, self.model(x, training=False)),
                                 images, white_box.normal_start(images, self.attack_noise(images)))
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            adv_logits = self.model(images_adv, training=True)
            per_example = losses.trades_loss(labels, logits, adv_logits, self.trades_beta)
        self.minimize(tape, per_example)
        natural = losses.cross_entropy(labels, logits)
        robust = losses.kl_divergence(logits, adv_logits)
        return self.step_logs(learning_rate, loss=per_example, cross_entropy=natural, kl_robust=robust)


class _SingleTeacherTrainer(Trainer):
    """A student distilled from one frozen (robust) teacher."""

    def __init__(self, student, teacher, **kwargs):
        super().__init__(student, **kwargs)
        self.teacher = loading.check_logits(teacher, "the teacher")
        teacher.trainable = False

    @property
    def student(self):
        """The network being trained (keras.distillation.Distiller's name for it)."""
        return self.model


class ARDTrainer(_SingleTeacherTrainer):
    """Adversarially Robust Distillation: the teacher's clean soft labels at temperature tau, on the student's PGD.

    Args:
      student: the keras.Model being trained; `trainer.student` after training.
      teacher: the frozen robust teacher (logits).
      temperature: tau. alpha: weight of the tau^2 KL term (1 - alpha weighs CE on clean images).
      **kwargs: the Trainer's.

    Example:

    >>> trainer = mtard_tf.ARDTrainer(student, robust_teacher)
    >>> trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    >>> trainer.fit(train_dataset, epochs=1)
    """

    def __init__(self, student, teacher, *, temperature=BaselineConfig.ard_temperature, alpha=BaselineConfig.ard_alpha,
                 **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def train_step(self, data):
        images, labels = self.unpack(data)
        learning_rate = self.current_learning_rate()
        start = white_box.uniform_start(images, self.attack_noise(images, symmetric_uniform), self.epsilon)
        images_adv = self.attack(self.cross_entropy_objective(labels), images, start)
        teacher_logits = self.teacher(images, training=False)
        with tf.GradientTape() as tape:
            adv_logits = self.student(images_adv, training=True)
            logits = self.student(images, training=True)
            per_example = losses.ard_loss(labels, teacher_logits, adv_logits, logits, self.temperature, self.alpha)
        self.minimize(tape, per_example)
        kl = losses.class_mean_kl_divergence(teacher_logits, adv_logits, self.temperature)
        cross_entropy = losses.cross_entropy(labels, logits)
        return self.step_logs(learning_rate, loss=per_example, kl_adv=kl, cross_entropy=cross_entropy)


class RSLADTrainer(_SingleTeacherTrainer):
    """Robust Soft Label Adversarial Distillation: the teacher's clean soft labels on both x' and x.

    Args:
      student: the keras.Model being trained; `trainer.student` after training.
      teacher: the frozen robust teacher (logits).
      adv_weight: w, the weight of the KL on adversarial images (1 - w on clean). kl_scale: multiplies both KLs.
      **kwargs: the Trainer's.

    Example:

    >>> trainer = mtard_tf.RSLADTrainer(student, robust_teacher)
    >>> trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    >>> trainer.fit(train_dataset, epochs=1)
    """

    def __init__(self, student, teacher, *, adv_weight=BaselineConfig.rslad_adv_weight, kl_scale=BalanceConfig.kl_scale,
                 **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.adv_weight = float(adv_weight)
        self.kl_scale = float(kl_scale)

    def train_step(self, data):
        images, labels = self.unpack(data)
        learning_rate = self.current_learning_rate()
        teacher_logits = self.teacher(images, training=False)
        images_adv = self.attack(
            lambda x: losses.kl_divergence(teacher_logits, self.student(x, training=False)), images,
            white_box.normal_start(images, self.attack_noise(images)))
        with tf.GradientTape() as tape:
            adv_logits = self.student(images_adv, training=True)
            logits = self.student(images, training=True)
            per_example = losses.rslad_loss(teacher_logits, adv_logits, logits, self.adv_weight, self.kl_scale)
        self.minimize(tape, per_example)
        soft_labels = losses.teacher_probabilities(teacher_logits)
        kl_adv = losses.distillation_kl(adv_logits, soft_labels)
        kl_nat = losses.distillation_kl(logits, soft_labels)
        return self.step_logs(learning_rate, loss=per_example, kl_adv=kl_adv, kl_nat=kl_nat)


class AdaADTrainer(_SingleTeacherTrainer):
    """Adaptive Adversarial Distillation: x' is where teacher and student disagree most; match the teacher there.

    Args:
      student: the keras.Model being trained; `trainer.student` after training.
      teacher: the frozen robust teacher (logits).
      alpha: weight of the KL on adversarial images (1 - alpha on clean).
      **kwargs: the Trainer's.

    Example:

    >>> trainer = mtard_tf.AdaADTrainer(student, robust_teacher)
    >>> trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    >>> trainer.fit(train_dataset, epochs=1)
    """

    def __init__(self, student, teacher, *, alpha=BaselineConfig.adaad_alpha, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.alpha = float(alpha)

    def train_step(self, data):
        images, labels = self.unpack(data)
        learning_rate = self.current_learning_rate()
        images_adv = self.attack(
            lambda x: losses.kl_divergence(self.teacher(x, training=False), self.student(x, training=False)),
            images, white_box.normal_start(images, self.attack_noise(images)))
        teacher_nat = self.teacher(images, training=False)
        teacher_adv = self.teacher(images_adv, training=False)
        with tf.GradientTape() as tape:
            logits = self.student(images, training=True)
            adv_logits = self.student(images_adv, training=True)
            per_example = losses.adaad_loss(teacher_adv, adv_logits, teacher_nat, logits, self.alpha)
        self.minimize(tape, per_example)
        kl_adv = losses.adaad_kl(teacher_adv, adv_logits)
        kl_nat = losses.adaad_kl(teacher_nat, logits)
        return self.step_logs(learning_rate, loss=per_example, kl_adv=kl_adv, kl_nat=kl_nat)
