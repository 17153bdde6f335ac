"""Tests of mtard_tf/import_torch.py against PyTorch reference modules written here from the published definitions.

Needs the optional torch (requirements-torch.txt); skipped without it.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import keras  # noqa: E402  (after the importorskip)

from mtard_tf import import_torch, models  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# PyTorch reference modules, written from the architectures' descriptions (module names as in the published code).


class KuangliuBasicBlock(nn.Module):
    """kuangliu/pytorch-cifar BasicBlock: conv-bn-relu-conv-bn + (1x1 conv + bn | identity), relu."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class KuangliuResNet18(nn.Module):
    def __init__(self, width=64, blocks=2, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        for stage, (mult, stride) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
            layers = []
            for i in range(blocks):
                layers.append(KuangliuBasicBlock(in_planes, width * mult, stride if i == 0 else 1))
                in_planes = width * mult
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, out.shape[-1])
        return self.linear(out.view(out.size(0), -1))


class TorchvisionBasicBlock(nn.Module):
    """chenyaofo/pytorch-cifar-models (torchvision-style) BasicBlock with a `downsample` projection."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """The CIFAR ResNet-(6n+2) of chenyaofo/pytorch-cifar-models, used as MTARD's clean ResNet-56 teacher."""

    def __init__(self, depth=56, width=16, num_classes=10, mean=None, std=None):
        super().__init__()
        n = (depth - 2) // 6
        self.mean, self.std = mean, std  # transforms.Normalize applied before the network, if given
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for stage, (mult, stride) in enumerate(zip((1, 2, 4), (1, 2, 2)), start=1):
            planes = width * mult
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            layers = [TorchvisionBasicBlock(inplanes, planes, stride, downsample)]
            inplanes = planes
            layers += [TorchvisionBasicBlock(inplanes, planes) for _ in range(1, n)]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        if self.mean is not None:
            x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TradesBlock(nn.Module):
    """TRADES WideResNet BasicBlock: pre-activation; the projection sees the activated input."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(
            in_planes, out_planes, 1, stride, 0, bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class TradesNetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[
            TradesBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(nb_layers)])

    def forward(self, x):
        return self.layer(x)


class TradesWideResNet(nn.Module):
    def __init__(self, depth=34, widen_factor=10, num_classes=10):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = TradesNetworkBlock(n, channels[0], channels[1], 1)
        self.sub_block1 = TradesNetworkBlock(n, channels[0], channels[1], 1)  # defined, never used
        self.block2 = TradesNetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = TradesNetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, out.shape[-1])
        return self.fc(out.view(-1, self.nChannels))


class MobileBlock(nn.Module):
    """kuangliu MobileNetV2 Block: expand 1x1, depthwise 3x3, project 1x1; residual only at stride 1."""

    def __init__(self, in_planes, out_planes, expansion, stride):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, 1, 0, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class KuangliuMobileNetV2(nn.Module):
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=10, width_multiplier=1.0, max_blocks=0):
        super().__init__()

        def c(channels):
            return max(1, int(round(channels * width_multiplier)))

        self.conv1 = nn.Conv2d(3, c(32), 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c(32))
        layers, in_planes = [], c(32)
        for expansion, out_planes, num_blocks, stride in self.cfg:
            num_blocks = min(num_blocks, max_blocks) if max_blocks else num_blocks
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(MobileBlock(in_planes, c(out_planes), expansion, s))
                in_planes = c(out_planes)
        self.layers = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(in_planes, c(1280), 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(c(1280))
        self.linear = nn.Linear(c(1280), num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, out.shape[-1])
        return self.linear(out.view(out.size(0), -1))


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


def _reference(factory, seed=0):
    torch.manual_seed(seed)
    return _randomize_batchnorm(factory(), seed)


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


ARCHITECTURES = {
    # spec -> PyTorch reference factory (tiny configurations)
    "resnet18:width=4,blocks=1": lambda: KuangliuResNet18(width=4, blocks=1, num_classes=10),
    "resnet18:width=4": lambda: KuangliuResNet18(width=4, blocks=2, num_classes=10),
    "resnet56:depth=14,width=4": lambda: CifarResNet(depth=14, width=4, num_classes=10),
    "wrn34_10:depth=10,widen=1": lambda: TradesWideResNet(depth=10, widen_factor=1, num_classes=10),
    "wrn34_10:depth=16,widen=2": lambda: TradesWideResNet(depth=16, widen_factor=2, num_classes=10),
    "mobilenetv2:width_multiplier=0.25": lambda: KuangliuMobileNetV2(num_classes=10, width_multiplier=0.25),
}


# ---------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("spec", sorted(ARCHITECTURES))
def test_logits_match_pytorch(spec):
    reference = _reference(ARCHITECTURES[spec])
    model = import_torch.convert_state_dict(spec, reference.state_dict(), num_classes=10)
    _compare(reference, model)


def test_wide_resnet_checkpoint_carries_unused_sub_block():
    reference = _reference(ARCHITECTURES["wrn34_10:depth=10,widen=1"])
    assert any(k.startswith("sub_block1.") for k in reference.state_dict())
    model = import_torch.convert_state_dict("wrn34_10:depth=10,widen=1", reference.state_dict(), 10)
    assert not any("sub_block" in layer.name for layer in model.layers)


def test_every_weighted_layer_maps_to_a_torch_module():
    for spec in ARCHITECTURES:
        model = models.build_model(spec, 10)
        torch_names = {k.rsplit(".", 1)[0] for k in _reference(ARCHITECTURES[spec]).state_dict()}
        for layer in model.layers:
            if layer.weights:
                assert import_torch.torch_path(layer.name) in torch_names, (spec, layer.name)


def test_normalization_from_spec_matches_normalised_reference():
    mean, std = models.NORMALIZATION_PRESETS["cifar10"]
    reference = _reference(lambda: CifarResNet(depth=8, width=4, num_classes=10, mean=mean, std=std))
    model = import_torch.convert_state_dict("resnet56:depth=8,width=4,normalize=cifar10", reference.state_dict(), 10)
    _compare(reference, model)


def test_normalization_tensors_in_the_state_dict():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    reference = _reference(lambda: CifarResNet(depth=8, width=4, num_classes=10, mean=mean, std=std))
    state = dict(reference.state_dict())
    state["mu"], state["sigma"] = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    model = import_torch.convert_state_dict("resnet56:depth=8,width=4", state, 10)
    assert "normalize" in {layer.name for layer in model.layers}
    _compare(reference, model)
    with pytest.raises(import_torch.CheckpointError, match="differs from normalize=cifar10"):
        import_torch.convert_state_dict("resnet56:depth=8,width=4,normalize=cifar10", state, 10)


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict", "model+module", "net"])
def test_checkpoint_file_layouts(wrap, tmp_path):
    reference = _reference(ARCHITECTURES["resnet56:depth=14,width=4"])
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
    import_torch.convert_checkpoint("resnet56:depth=14,width=4", path, 10, out)
    _compare(reference, keras.models.load_model(out))


def test_wrong_shape_missing_and_unexpected_tensors_are_refused():
    spec = "resnet18:width=4,blocks=1"
    state = dict(_reference(ARCHITECTURES[spec]).state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(8, 4, 5, 5)
    del state["layer3.0.bn2.running_var"]
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(import_torch.CheckpointError) as info:
        import_torch.convert_state_dict(spec, state, 10)
    message = str(info.value)
    assert "\n" not in message
    assert "missing 1: layer3.0.bn2.running_var" in message
    assert "unexpected 1: extra.weight" in message
    assert "mis-shaped 1: layer2.0.conv1.weight (checkpoint (8, 4, 5, 5), resnet18 needs (8, 4, 3, 3))" in message


def test_wrong_class_count_and_wrong_architecture_are_refused():
    state = _reference(ARCHITECTURES["wrn34_10:depth=10,widen=1"]).state_dict()
    with pytest.raises(import_torch.CheckpointError, match=r"mis-shaped 2: fc.weight \(checkpoint \(10, 64\)"):
        import_torch.convert_state_dict("wrn34_10:depth=10,widen=1", state, 100)
    with pytest.raises(import_torch.CheckpointError, match="missing .*unexpected"):
        import_torch.convert_state_dict("resnet56:depth=8,width=4", state, 10)


def test_not_a_state_dict_is_refused(tmp_path):
    with pytest.raises(import_torch.CheckpointError, match="not a tensor"):
        import_torch.convert_state_dict("resnet56:depth=8", {"conv1.weight": "oops"}, 10)
    with pytest.raises(import_torch.CheckpointError, match="no such checkpoint file"):
        import_torch.load_checkpoint(str(tmp_path / "absent.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(import_torch.CheckpointError, match="cannot read"):
        import_torch.load_checkpoint(str(garbage))


def _run_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mtard_tf.import_torch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_line(tmp_path):
    spec = "mobilenetv2:width_multiplier=0.25,max_blocks=1"
    reference = _reference(lambda: KuangliuMobileNetV2(num_classes=10, width_multiplier=0.25, max_blocks=1))
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
