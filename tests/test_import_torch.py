"""Tests of mtard_tf/pytorch/importer.py against the PyTorch modules of mtard_tf/pytorch/modules.py, which are written
from the published definitions.

Needs the optional torch (requirements-torch.txt); skipped without it.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import keras  # noqa: E402  (after the importorskip)

from mtard_tf.pytorch import importer  # noqa: E402
from mtard_tf.models import architectures
from mtard_tf.pytorch.modules import build_torch_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _randomize_batchnorm(module, seed):
    """Non-trivial BatchNorm affine parameters and running statistics, so that eval mode really uses them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                shape = m.running_mean.shape
                m.weight.copy_(0.5 + torch.rand(shape, generator=generator))
                m.bias.copy_(0.1 * torch.randn(shape, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
                m.num_batches_tracked.fill_(7)
    return module.eval()


def _reference(spec, seed=0):
    """The PyTorch module of a model spec, with randomised BatchNorm, in eval mode."""
    torch.manual_seed(seed)
    return _randomize_batchnorm(build_torch_model(spec), seed)


def _compare(torch_module, keras_model, batch=4, seed=1, size=32):
    x = np.random.default_rng(seed).uniform(0.0, 1.0, (batch, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = torch_module(torch.from_numpy(x)).numpy()
    actual = keras.ops.convert_to_numpy(keras_model(np.transpose(x, (0, 2, 3, 1)), training=False))
    assert actual.shape == expected.shape
    assert np.std(expected) > 1e-3  # the comparison is not between constants
    difference = float(np.max(np.abs(actual - expected)))
    assert difference < TOLERANCE, f"max |keras - torch| = {difference}"
    return difference


ARCHITECTURES = (  # tiny configurations
    "resnet18:width=4,blocks=1",
    "resnet18:width=4",
    "resnet56:depth=14,width=4",
    "wrn34_10:depth=10,widen=1",
    "wrn34_10:depth=16,widen=2",
    "mobilenetv2:width_multiplier=0.25",
    "dm_wrn:depth=10,width=1",
    "dm_wrn:depth=16,width=2",
    "dm_wrn:depth=10,width=2,activation=relu,normalize=cifar100",
)


# ---------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("spec", ARCHITECTURES)
def test_logits_match_pytorch(spec):
    reference = _reference(spec)
    model = importer.convert_state_dict(spec, reference.state_dict(), num_classes=10)
    _compare(reference, model)


def test_wide_resnet_checkpoint_carries_unused_sub_block():
    reference = _reference("wrn34_10:depth=10,widen=1")
    assert any(k.startswith("sub_block1.") for k in reference.state_dict())
    model = importer.convert_state_dict("wrn34_10:depth=10,widen=1", reference.state_dict(), 10)
    assert not any("sub_block" in layer.name for layer in model.layers)


def test_every_weighted_layer_maps_to_a_torch_module():
    for spec in ARCHITECTURES:
        model = architectures.build_model(spec, 10)
        torch_names = {k.rsplit(".", 1)[0] for k in _reference(spec).state_dict()}
        for layer in model.layers:
            if layer.weights:
                assert importer.torch_path(layer.name) in torch_names, (spec, layer.name)


def test_normalization_from_spec_matches_normalised_reference():
    mean, std = architectures.NORMALIZATION_PRESETS["cifar10"]
    reference = _reference("resnet56:depth=8,width=4,normalize=cifar10")
    assert torch.equal(reference.input_mean.flatten(), torch.tensor(mean))
    model = importer.convert_state_dict("resnet56:depth=8,width=4,normalize=cifar10", reference.state_dict(), 10)
    _compare(reference, model)


def test_normalization_tensors_in_the_state_dict():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    reference = _reference("resnet56:depth=8,width=4,normalize=" + "/".join(map(str, mean + std)))
    state = dict(reference.state_dict())
    state["mu"], state["sigma"] = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    model = importer.convert_state_dict("resnet56:depth=8,width=4", state, 10)
    assert "normalize" in {layer.name for layer in model.layers}
    _compare(reference, model)
    with pytest.raises(importer.CheckpointError, match="differs from normalize=cifar10"):
        importer.convert_state_dict("resnet56:depth=8,width=4,normalize=cifar10", state, 10)


def test_dm_wide_resnet_has_the_robustbench_state_dict():
    """The module names of RobustBench's DMWideResNet (robustbench/model_zoo/architectures/dm_wide_resnet.py), whose
    mean / std buffers are not persistent: the published checkpoints hold the weights only."""
    keys = set(_reference("dm_wrn:depth=10,width=1").state_dict())
    assert {"init_conv.weight", "layer.0.block.0.batchnorm_0.weight", "layer.0.block.0.conv_0.weight",
            "layer.0.block.0.batchnorm_1.running_var", "layer.0.block.0.conv_1.weight",
            "layer.1.block.0.shortcut.weight", "layer.2.block.0.shortcut.weight", "batchnorm.running_mean",
            "logits.weight", "logits.bias"} <= keys
    assert "layer.0.block.0.shortcut.weight" not in keys  # 16 -> 16 channels at width 1: identity
    assert not keys & {"mean", "std"}


def test_dm_wide_resnet_normalization_in_the_checkpoint():
    """A checkpoint that carries DMWideResNet's mean / std buffers (persistent in some versions) sets the
    normalisation; a different `normalize` in --arch is refused."""
    reference = _reference("dm_wrn:depth=10,width=1,normalize=cifar100")
    mean, std = architectures.DM_NORMALIZATION_PRESETS["cifar100"]
    state = dict(reference.state_dict(), mean=torch.tensor(mean).view(3, 1, 1), std=torch.tensor(std).view(3, 1, 1))
    _compare(reference, importer.convert_state_dict("dm_wrn:depth=10,width=1", state, 10))
    _compare(reference, importer.convert_state_dict("dm_wrn:depth=10,width=1,normalize=cifar100", state, 10))
    with pytest.raises(importer.CheckpointError, match="differs from normalize=cifar10 in --arch"):
        importer.convert_state_dict("dm_wrn:depth=10,width=1,normalize=cifar10", state, 10)


@pytest.mark.parametrize("prefix", ["module.", "model."])
def test_robustbench_trades_wide_resnet_checkpoint(prefix, tmp_path):
    """RobustBench's Zhang2019Theoretically (the TRADES WRN-34-10) is its WideResNet(sub_block1=True), the TRADES
    layout, saved as {"state_dict": ...} with prefixed keys; here at depth 10."""
    spec = "wrn34_10:depth=10,widen=1"
    reference = _reference(spec)
    path = str(tmp_path / "Zhang2019Theoretically.pt")
    torch.save({"state_dict": {prefix + k: v for k, v in reference.state_dict().items()}}, path)
    _compare(reference, importer.convert_checkpoint(spec, path, 10))


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict", "model+module", "net"])
def test_checkpoint_file_layouts(wrap, tmp_path):
    reference = _reference("resnet56:depth=14,width=4")
    state = reference.state_dict()
    if "module" in wrap:  # DataParallel
        state = {"module." + k: v for k, v in state.items()}
    checkpoint = {
        "plain": state, "module": state, "state_dict": {"state_dict": state, "epoch": 3},
        "model+module": {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3},
        "net": {"net": state, "acc": 93.2, "epoch": 200},
    }[wrap]
    path = str(tmp_path / "checkpoint.pt")
    torch.save(checkpoint, path)
    out = str(tmp_path / "teacher.keras")
    importer.convert_checkpoint("resnet56:depth=14,width=4", path, 10, out)
    _compare(reference, keras.models.load_model(out))


def test_wrong_shape_missing_and_unexpected_tensors_are_refused():
    spec = "resnet18:width=4,blocks=1"
    state = dict(_reference(spec).state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(8, 4, 5, 5)
    del state["layer3.0.bn2.running_var"]
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(importer.CheckpointError) as info:
        importer.convert_state_dict(spec, state, 10)
    message = str(info.value)
    assert "\n" not in message
    assert "missing 1: layer3.0.bn2.running_var" in message
    assert "unexpected 1: extra.weight" in message
    assert "mis-shaped 1: layer2.0.conv1.weight (checkpoint (8, 4, 5, 5), resnet18 needs (8, 4, 3, 3))" in message


def test_wrong_class_count_and_wrong_architecture_are_refused():
    state = _reference("wrn34_10:depth=10,widen=1").state_dict()
    with pytest.raises(importer.CheckpointError, match=r"mis-shaped 2: fc.weight \(checkpoint \(10, 64\)"):
        importer.convert_state_dict("wrn34_10:depth=10,widen=1", state, 100)
    with pytest.raises(importer.CheckpointError, match="missing .*unexpected"):
        importer.convert_state_dict("resnet56:depth=8,width=4", state, 10)


def test_not_a_state_dict_is_refused(tmp_path):
    with pytest.raises(importer.CheckpointError, match="not a tensor"):
        importer.convert_state_dict("resnet56:depth=8", {"conv1.weight": "oops"}, 10)
    with pytest.raises(importer.CheckpointError, match="no such checkpoint file"):
        importer.load_checkpoint(str(tmp_path / "absent.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(importer.CheckpointError, match="cannot read"):
        importer.load_checkpoint(str(garbage))


def _run_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mtard_tf.pytorch.importer", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_line(tmp_path):
    spec = "mobilenetv2:width_multiplier=0.25,max_blocks=1"
    reference = _reference(spec)
    good = str(tmp_path / "good.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, good)
    out = str(tmp_path / "student.keras")
    result = _run_cli(f"--arch={spec}", f"--checkpoint={good}", "--num_classes=10", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    _compare(reference, keras.models.load_model(out))

    bad_state = dict(reference.state_dict())
    bad_state["linear.weight"] = torch.zeros(7, 3)
    bad = str(tmp_path / "bad.pt")
    torch.save(bad_state, bad)
    result = _run_cli(f"--arch={spec}", f"--checkpoint={bad}", "--num_classes=10", f"--out={tmp_path / 'x.keras'}")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("import_torch: error:")]
    assert len(errors) == 1 and "mis-shaped 1: linear.weight" in errors[0], result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "x.keras")
