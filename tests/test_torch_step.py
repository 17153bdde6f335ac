"""Tests of mtard_tf/pytorch/step.py, the PyTorch B-MTARD step of the benchmark's side-by-side, and of the spec parsing
of mtard_tf/pytorch/modules.py. Tiny networks; needs the optional torch (requirements-torch.txt), skipped without it."""

import pytest

torch = pytest.importorskip("torch")

from mtard_tf.models import architectures  # noqa: E402  (after the importorskip)
from mtard_tf.pytorch.modules import CifarResNet, DMWideResNet, TradesWideResNet, build_torch_model  # noqa: E402
from mtard_tf.pytorch.step import TorchBMTARDStep  # noqa: E402

SPECS = ("resnet18:width=4,blocks=1", "resnet56:depth=8,width=4", "wrn34_10:depth=10,widen=1")
EPSILON = 8 / 255


def _batch(size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, 3, 32, 32, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def test_specs_build_the_named_architectures():
    assert isinstance(build_torch_model("resnet56:depth=14"), CifarResNet)
    assert len(build_torch_model("resnet56:depth=14").layer1) == 2  # (14 - 2) / 6 blocks a stage
    wide = build_torch_model("wrn34_10:depth=10,widen=2", num_classes=100)
    assert isinstance(wide, TradesWideResNet) and len(wide.block1.layer) == 1 and wide.fc.out_features == 100
    assert build_torch_model("resnet18:width=8").conv1.out_channels == 8
    deep_mind = build_torch_model("dm_wrn:depth=16,width=2,normalize=cifar100", num_classes=100)
    assert isinstance(deep_mind, DMWideResNet) and len(deep_mind.layer[2].block) == 2
    assert deep_mind.logits.out_features == 100 and isinstance(deep_mind.relu, torch.nn.SiLU)
    cifar100_std = architectures.DM_NORMALIZATION_PRESETS["cifar100"][1]
    assert torch.equal(deep_mind.input_std.flatten(), torch.tensor(cifar100_std))
    with pytest.raises(architectures.ModelSpecError, match="6n\\+2"):
        build_torch_model("resnet56:depth=15")


def test_step_trains_within_the_balancing_constraints():
    """On a fixed batch the distillation loss falls; the weights stay normalised and the temperatures in [1, 10]."""
    step = TorchBMTARDStep.from_specs(*SPECS, attack_steps=2)
    images, labels = _batch()
    history = [step.train_step(images, labels) for _ in range(6)]
    assert history[-1]["loss"] < history[0]["loss"]
    for stats in history:
        assert stats["weight_adv"] + stats["weight_nat"] == pytest.approx(1.0, abs=1e-6)
        assert min(stats["weight_adv"], stats["weight_nat"]) >= 0
        assert 1.0 <= min(stats["temperature_adv"], stats["temperature_nat"])
        assert max(stats["temperature_adv"], stats["temperature_nat"]) <= 10.0


def test_temperatures_are_clipped_to_their_range():
    """A rate of 4 crosses the bounds within two steps: the entropy balance must clip to [1, 10]."""
    step = TorchBMTARDStep.from_specs(*SPECS, attack_steps=1, temperature_rate=4.0)
    images, labels = _batch()
    for _ in range(4):
        step.train_step(images, labels)
        assert 1.0 <= step.temperature_adv <= 10.0 and 1.0 <= step.temperature_nat <= 10.0
    assert (step.temperature_adv, step.temperature_nat) != (1.0, 1.0)


def test_adversarial_examples_stay_in_the_ball_and_the_image_range():
    step = TorchBMTARDStep.from_specs(*SPECS, attack_steps=3)
    images, labels = _batch()
    images_adv = step.adversarial_examples(images, labels)
    assert not images_adv.requires_grad
    assert float((images_adv - images).abs().max()) <= EPSILON + 1e-6
    assert float(images_adv.min()) >= 0.0 and float(images_adv.max()) <= 1.0
    assert float((images_adv - images).abs().max()) > EPSILON / 2  # the attack moved the images


def test_mixed_bfloat16_step_runs_the_networks_in_bfloat16():
    step = TorchBMTARDStep.from_specs(*SPECS, attack_steps=1, precision="mixed_bfloat16")
    images, labels = _batch()
    with step.autocast():
        assert step.student(images).dtype == torch.bfloat16
    stats = step.train_step(images, labels)
    assert all(torch.isfinite(torch.tensor(value)) for value in stats.values())
    with pytest.raises(ValueError, match="unknown precision"):
        TorchBMTARDStep.from_specs(*SPECS, precision="float64")
