"""The `--method` registry: every way to train a network (the methods of the paper's comparison tables), each
name mapped to how its trainer is built for a student.

| method  | trainer                                    | teachers      | loss (losses.py)   |
|---------|--------------------------------------------|---------------|--------------------|
| natural | baselines.NaturalTrainer                   |               | natural_loss       |
| sat     | baselines.AdversarialTrainer(pgd_at)       |               | sat_loss           |
| trades  | baselines.AdversarialTrainer(trades)       |               | trades_loss        |
| ard     | baselines.ARDTrainer                       | robust        | ard_loss           |
| rslad   | baselines.RSLADTrainer                     | robust        | rslad_loss         |
| adaad   | baselines.AdaADTrainer                     | robust        | adaad_loss         |
| mtard   | b_mtard.Distiller(balance="mtard")         | clean, robust | multi_teacher_loss |
| b_mtard | b_mtard.Distiller(balance="b_mtard")       | clean, robust | multi_teacher_loss |

config.METHOD_NAMES spells the same names out for the flags, which are defined before TensorFlow is imported (a
test checks that they agree).
"""

import dataclasses
from typing import Callable

from mtard_tf import config as config_lib
from mtard_tf.methods.b_mtard import Distiller
from mtard_tf.methods.baselines import (AdaADTrainer, AdversarialTrainer, ARDTrainer, NaturalTrainer,
                                        RSLADTrainer)


@dataclasses.dataclass(frozen=True)
class Method:
    """A student training method.

    build(student, teachers, config, schedule, **common) -> Trainer, where `teachers` maps "clean" / "robust" to the
    loaded frozen teachers this method names in `teachers`, `config` is a config.Config, `schedule(value)` makes
    the run's milestone schedule of a rate, and `common` holds the Trainer arguments shared by all methods (attack,
    weight decay, validation, seed).

    Example:

    >>> method = mtard_tf.get_method("rslad")
    >>> method.display_name, method.teachers
    ('RSLAD', ('robust',))
    """
    display_name: str
    teachers: tuple
    build: Callable


def _natural(student, frozen, config, schedule, **common):
    return NaturalTrainer(student, **common)


def _adversarial(robust_method):
    def build(student, frozen, config, schedule, **common):
        return AdversarialTrainer(student, method=robust_method, trades_beta=config.baselines.trades_beta, **common)
    return build


def _ard(student, frozen, config, schedule, **common):
    return ARDTrainer(student, frozen["robust"], temperature=config.baselines.ard_temperature,
                      alpha=config.baselines.ard_alpha, **common)


def _rslad(student, frozen, config, schedule, **common):
    return RSLADTrainer(student, frozen["robust"], adv_weight=config.baselines.rslad_adv_weight,
                        kl_scale=config.balance.kl_scale, **common)


def _adaad(student, frozen, config, schedule, **common):
    # No kl_scale: AdaAD's own code fixes its reduction per dataset (losses.adaad_kl), with no x10 on CIFAR-100.
    return AdaADTrainer(student, frozen["robust"], alpha=config.baselines.adaad_alpha, **common)


def _distiller(balance):
    def build(student, frozen, config, schedule, **common):
        rules = config.balance
        return Distiller(student, frozen["clean"], frozen["robust"], balance=balance, kl_scale=rules.kl_scale,
                         weight_rate=schedule(rules.weight_rate), temperature_rate=schedule(rules.temperature_rate),
                         temperature_min=rules.temperature_min, temperature_max=rules.temperature_max,
                         beta=rules.beta, **common)
    return build


# In the order of the paper's tables (B-MTARD last).
METHODS = {
    "natural": Method("Natural", (), _natural),
    "sat": Method("SAT", (), _adversarial("pgd_at")),
    "trades": Method("TRADES", (), _adversarial("trades")),
    "ard": Method("ARD", ("robust",), _ard),
    "rslad": Method("RSLAD", ("robust",), _rslad),
    "adaad": Method("AdaAD", ("robust",), _adaad),
    "mtard": Method("MTARD", ("clean", "robust"), _distiller("mtard")),
    "b_mtard": Method("B-MTARD", ("clean", "robust"), _distiller("b_mtard")),
}
METHOD_NAMES = tuple(METHODS)
# How a teacher is trained (config.TEACHER_METHODS) -> the student method whose trainer does it.
TEACHER_TRAINING = {"natural": "natural", "trades": "trades", "pgd_at": "sat"}


def trainer_arguments(config, eval_attack_steps=None):
    """The Trainer arguments every method shares, from config.Config `config`: the training attack, the weight decay,
    the validation attack's steps (`eval_attack_steps`, default config.attack.eval_steps) and the seed."""
    attack = config.attack
    return dict(epsilon=attack.epsilon, attack_steps=attack.steps, attack_step_size=attack.step_size,
                weight_decay=config.schedule.weight_decay,
                eval_attack_steps=attack.eval_steps if eval_attack_steps is None else eval_attack_steps,
                seed=config.runtime.seed)


def get_method(name):
    """The registered Method called `name`.

    Args:
      name: one of natural, sat, trades, ard, rslad, adaad, mtard, b_mtard (the paper's tables, in order).

    Returns:
      The Method: its display name, the teachers it needs ("clean", "robust") and the builder of its trainer.

    Raises:
      ConfigError (a ValueError's counterpart for users) naming the choices, for an unknown name.

    Example:

    >>> mtard_tf.get_method("b_mtard").teachers
    ('clean', 'robust')
    """
    if name not in METHODS:
        raise config_lib.ConfigError(f"unknown method '{name}', expected one of {', '.join(METHOD_NAMES)}")
    return METHODS[name]
