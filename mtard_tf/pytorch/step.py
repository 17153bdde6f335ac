"""The B-MTARD train step in PyTorch eager mode, for the benchmark's side-by-side (--compare_torch).

It does the work of `Distiller.train_step` with the same passes and shapes. One step on a batch (x, y), as the
reference runs it (zhaoshiji123/MTARD-extension resnet18_mtard_cifar10.py L104-172; its PGD: zhaoshiji123/MTARD
mtard/mtard_loss.py L27-53):
  1. x' = K PGD steps of size alpha on the student's cross-entropy (student in eval mode) in the eps-ball around x,
     clipped to [0, 1], from x + 0.001 N(0, I);
  2. p_a = softmax(T_a(x') / tau_a), p_n = softmax(T_n(x) / tau_n), teachers in eval mode without gradients;
  3. L_adv = KL(p_a, S(x')), L_nat = KL(p_n, S(x)) with the student in train mode (x' first, then x);
  4. Normalization Loss Balance updates (w_adv, w_nat) from this step's batch-mean losses, and
     L = kl_scale (w_adv L_adv + w_nat L_nat) with the updated weights;
  5. one SGD step (momentum, coupled weight decay) on the student;
  6. Entropy-Based Balance sets (tau_a, tau_n) for the next step.
The balancing rules are balancing.py's own functions, applied to the step's scalar statistics on the host (the
reference also takes them with .item()), so each rule has one definition. Under a mixed precision policy the
networks run under torch.autocast in the compute dtype (bfloat16 or float16, with a gradient scaler for float16, as
Keras's LossScaleOptimizer); losses and the attack's objective are float32.

Images are NCHW float32 in [0, 1], labels int64. torch is an optional dependency (requirements-torch.txt): import
this module only where torch is wanted.
"""

import contextlib

import torch
from torch.nn import functional as F

from mtard_tf.attacks import white_box
from mtard_tf.methods import balancing, losses
from mtard_tf.pytorch.modules import build_torch_model

# Keras dtype policy -> the autocast dtype of the networks (None: float32, no autocast).
AUTOCAST_DTYPES = {"float32": None, "mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}


def teacher_probabilities(teacher_logits, temperature):
    """losses.teacher_probabilities: p = softmax(z / tau), in float32."""
    return F.softmax(teacher_logits.float() / temperature, dim=-1)


def distillation_kl(student_logits, teacher_probs):
    """losses.distillation_kl: per-example mean over classes of p * (log(p + 1e-5) - log softmax(z))."""
    log_student = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_probs * (torch.log(teacher_probs + losses.LOG_EPSILON) - log_student)).mean(dim=-1)


def teacher_entropy(teacher_probs):
    """losses.teacher_entropy: per-example mean over classes of p * log(p + 1e-5)."""
    return (teacher_probs * torch.log(teacher_probs + losses.LOG_EPSILON)).mean(dim=-1)


def project(x_adv, x, epsilon):
    """attacks.project: clip_[0,1](clip_[x-eps, x+eps](x_adv))."""
    return torch.minimum(torch.maximum(x_adv, x - epsilon), x + epsilon).clamp(0.0, 1.0)


class TorchBMTARDStep:
    """The student, the two frozen teachers, the SGD optimizer and the balancing state of B-MTARD.

    Defaults are the paper's (and `Distiller`'s): eps 8/255, 10 PGD steps of 2/255, SGD(0.1, momentum 0.9, weight
    decay 2e-4), weight rate 0.025, temperature rate 0.001 within [1, 10], beta 1.
    """

    def __init__(self, student, clean_teacher, robust_teacher, *, learning_rate=0.1, momentum=0.9,
                 weight_decay=2e-4, epsilon=8 / 255, attack_step_size=2 / 255, attack_steps=10, kl_scale=1.0,
                 weight_rate=0.025, temperature_rate=0.001, temperature_min=1.0, temperature_max=10.0, beta=1.0,
                 precision="float32", seed=0):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"unknown precision '{precision}', expected one of {', '.join(AUTOCAST_DTYPES)}")
        self.student = student
        self.clean_teacher = clean_teacher.eval().requires_grad_(False)
        self.robust_teacher = robust_teacher.eval().requires_grad_(False)
        self.device = next(student.parameters()).device
        self.optimizer = torch.optim.SGD(student.parameters(), lr=learning_rate, momentum=momentum,
                                         weight_decay=weight_decay)
        self.compute_dtype = AUTOCAST_DTYPES[precision]
        self.gradient_scaler = torch.amp.GradScaler(self.device.type, enabled=self.compute_dtype == torch.float16)
        self.epsilon = float(epsilon)
        self.attack_step_size = float(attack_step_size)
        self.attack_steps = int(attack_steps)
        self.kl_scale = float(kl_scale)
        self.weight_rate = float(weight_rate)
        self.temperature_rate = float(temperature_rate)
        self.temperature_min = float(temperature_min)
        self.temperature_max = float(temperature_max)
        self.beta = float(beta)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.temperature_adv = self.temperature_nat = 1.0
        self.weight_adv = self.weight_nat = 0.5
        self.initial_kl = None  # (L_adv(0), L_nat(0)), the first step's losses

    @classmethod
    def from_specs(cls, student, clean_teacher, robust_teacher, num_classes=10, device="cpu", seed=0, **kwargs):
        """The step for three model specs of mtard_tf.models.architectures (e.g. "resnet18:width=8"), initialised
        from `seed`."""
        torch.manual_seed(seed)
        networks = (build_torch_model(spec, num_classes).to(device)
                    for spec in (student, clean_teacher, robust_teacher))
        return cls(*networks, seed=seed, **kwargs)

    def autocast(self):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def adversarial_examples(self, images, labels):
        """x' = PGD on the student's summed CE (eval mode) from x + 0.001 N(0, I); the objective is scaled by
        white_box.GRADIENT_SCALE, as the TensorFlow attack's, so that float16 input gradients do not underflow."""
        self.student.eval()
        noise = torch.randn(images.shape, generator=self.generator, device=self.device)
        images_adv = images + 0.001 * noise
        for _ in range(self.attack_steps):
            images_adv.requires_grad_(True)
            with self.autocast():
                logits = self.student(images_adv)
            objective = F.cross_entropy(logits.float(), labels, reduction="sum") * white_box.GRADIENT_SCALE
            gradient, = torch.autograd.grad(objective, images_adv)
            images_adv = project(images_adv.detach() + self.attack_step_size * gradient.sign(), images, self.epsilon)
        return images_adv

    def update_loss_weights(self, kl_adv, kl_nat):
        """Normalization Loss Balance (balancing.loss_balance); the first step's losses become L(0)."""
        if self.initial_kl is None:
            self.initial_kl = (kl_adv, kl_nat)
        weights = balancing.loss_balance(
            self.weight_adv, self.weight_nat,
            balancing.relative_progress(kl_adv, self.initial_kl[0], self.beta),
            balancing.relative_progress(kl_nat, self.initial_kl[1], self.beta), self.weight_rate)
        self.weight_adv, self.weight_nat = (float(weight) for weight in weights)
        return self.weight_adv, self.weight_nat

    def update_temperatures(self, entropy_adv, entropy_nat):
        """Entropy-Based Balance (balancing.entropy_balance): the temperatures of the next step."""
        temperatures = balancing.entropy_balance(
            self.temperature_adv, self.temperature_nat, entropy_adv, entropy_nat, self.temperature_rate,
            self.temperature_min, self.temperature_max)
        self.temperature_adv, self.temperature_nat = (float(temperature) for temperature in temperatures)

    def train_step(self, images, labels):
        """One B-MTARD step on (images, labels); returns this step's statistics as floats."""
        temperature_adv, temperature_nat = self.temperature_adv, self.temperature_nat
        # 1. The student's adversarial examples.
        images_adv = self.adversarial_examples(images, labels)
        # 2. Teacher probabilities at this step's temperatures.
        with torch.no_grad(), self.autocast():
            robust_logits = self.robust_teacher(images_adv)
            clean_logits = self.clean_teacher(images)
        probs_adv = teacher_probabilities(robust_logits, temperature_adv)
        probs_nat = teacher_probabilities(clean_logits, temperature_nat)
        # 3-5. Losses, Normalization Loss Balance, and the student's update with the new weights.
        self.student.train()
        with self.autocast():
            adv_logits = self.student(images_adv)
            logits = self.student(images)
        kl_adv_per_example = distillation_kl(adv_logits, probs_adv)
        kl_nat_per_example = distillation_kl(logits, probs_nat)
        kl_adv, kl_nat = kl_adv_per_example.mean().item(), kl_nat_per_example.mean().item()
        weight_adv, weight_nat = self.update_loss_weights(kl_adv, kl_nat)
        loss = self.kl_scale * (weight_adv * kl_adv_per_example + weight_nat * kl_nat_per_example).mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.gradient_scaler.scale(loss).backward()
        self.gradient_scaler.step(self.optimizer)
        self.gradient_scaler.update()
        # 6. Entropy-Based Balance: teacher temperatures for the next step.
        entropy_adv = teacher_entropy(probs_adv).mean().item()
        entropy_nat = teacher_entropy(probs_nat).mean().item()
        self.update_temperatures(entropy_adv, entropy_nat)
        return {"loss": self.kl_scale * (weight_adv * kl_adv + weight_nat * kl_nat),
                "kl_adv": kl_adv, "kl_nat": kl_nat, "weight_adv": weight_adv, "weight_nat": weight_nat,
                "temperature_adv": temperature_adv, "temperature_nat": temperature_nat,
                "entropy_adv": entropy_adv, "entropy_nat": entropy_nat}
