"""The registry's architectures as PyTorch modules (optional torch support).

Each is written from the published code, with its module names, so that its state dict is a checkpoint of the kind
`mtard_tf.pytorch.importer` reads:

* `KuangliuResNet18`: kuangliu/pytorch-cifar models/resnet.py (ResNet-18, the students of RSLAD / MTARD);
* `CifarResNet`: chenyaofo/pytorch-cifar-models cifar_resnet.py (MTARD's clean ResNet-56 teacher);
* `TradesWideResNet`: yaodongyu/TRADES models/wideresnet.py (the robust WideResNet-34-10 teacher), with its unused
  `sub_block1`;
* `KuangliuMobileNetV2`: kuangliu/pytorch-cifar models/mobilenetv2.py;
* `DMWideResNet`: RobustBench robustbench/model_zoo/architectures/dm_wide_resnet.py (the WideResNets of Gowal et
  al. 2020, among them the paper's CIFAR-100 WRN-70-16 teacher), whose published checkpoints hold no mean / std.

They are written independently of mtard_tf.models.architectures (only the spec is read through
`architectures.model_arguments`), so the tests that compare the two are a check of the Keras models. They take NCHW
images in [0, 1]; the spec's `normalize` becomes a (mean, std) applied in forward() and kept out of the state dict, as a
transforms.Normalize would be.

torch is an optional dependency (requirements-torch.txt): import this module only where torch is wanted.
"""

import torch
from torch import nn
from torch.nn import functional as F

from mtard_tf.models import architectures


class CifarNetwork(nn.Module):
    """Base of the architectures: the optional input normalisation (x - mean) / std of the spec's `normalize`."""

    def __init__(self, normalize=None):
        super().__init__()
        stats = architectures.resolve_normalization(normalize)
        self.normalized = stats is not None
        if self.normalized:
            mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in stats)
            self.register_buffer("input_mean", mean, persistent=False)
            self.register_buffer("input_std", std, persistent=False)

    def normalize(self, x):
        return (x - self.input_mean) / self.input_std if self.normalized else x


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


class KuangliuResNet18(CifarNetwork):
    """kuangliu's ResNet-18: stages of `blocks` BasicBlocks with width * (1, 2, 4, 8) channels."""

    def __init__(self, width=64, blocks=2, num_classes=10, normalize=None):
        super().__init__(normalize)
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
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
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


class CifarResNet(CifarNetwork):
    """The CIFAR ResNet-(6n+2) of chenyaofo/pytorch-cifar-models: width * (1, 2, 4) channels, n blocks a stage."""

    def __init__(self, depth=56, width=16, num_classes=10, normalize=None):
        super().__init__(normalize)
        n = (depth - 2) // 6
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
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
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


class TradesWideResNet(CifarNetwork):
    """TRADES WideResNet-(6n+4)-widen: 16, 16 widen, 32 widen, 64 widen channels, n pre-activation blocks a group."""

    def __init__(self, depth=34, widen=10, num_classes=10, normalize=None):
        super().__init__(normalize)
        channels = [16, 16 * widen, 32 * widen, 64 * widen]
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
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
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


class KuangliuMobileNetV2(CifarNetwork):
    """kuangliu's CIFAR MobileNetV2, channels scaled by `width_multiplier`, stages capped at `max_blocks` (0: no cap)."""

    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, width_multiplier=1.0, max_blocks=0, num_classes=10, normalize=None):
        super().__init__(normalize)

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
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, out.shape[-1])
        return self.linear(out.view(out.size(0), -1))


class DMBlock(nn.Module):
    """DeepMind WideResNet _Block: pre-activation; conv_0 sees its input zero-padded by (1, 1, 1, 1) at stride 1 and by
    (0, 1, 0, 1) (right and bottom only) at stride 2; the 1x1 `shortcut`, where the width changes, sees the
    activated input. BatchNorm momentum 0.01 as DeepMind's training (Haiku decay 0.99; the published PyTorch code
    keeps PyTorch's 0.1, which only training sees)."""

    def __init__(self, in_planes, out_planes, stride, activation):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=0.01)
        self.relu_0 = activation()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=0.01)
        self.relu_1 = activation()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False) if in_planes != out_planes else None
        self.padding = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x):
        activated = self.relu_0(self.batchnorm_0(x))
        out = self.conv_0(F.pad(activated, self.padding))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return (x if self.shortcut is None else self.shortcut(activated)) + out


class DMBlockGroup(nn.Module):
    def __init__(self, num_blocks, in_planes, out_planes, stride, activation):
        super().__init__()
        self.block = nn.Sequential(*[
            DMBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, activation)
            for i in range(num_blocks)])

    def forward(self, x):
        return self.block(x)


class DMWideResNet(CifarNetwork):
    """DeepMind WideResNet-(6n+4)-width: init_conv to 16 channels, `layer` of three groups of n blocks (16, 32, 64
    times width channels), batchnorm + activation, average pool, `logits`. Swish is nn.SiLU, x * sigmoid(x), the
    function of the reference's Swish; the input normalisation is the spec's `normalize`."""

    activations = {"swish": nn.SiLU, "relu": nn.ReLU}

    def __init__(self, depth=70, width=16, activation="swish", num_classes=10, normalize=None):
        super().__init__(normalize)
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        act = self.activations[activation]
        self.init_conv = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(*[DMBlockGroup(n, channels[i], channels[i + 1], stride, act)
                                     for i, stride in enumerate((1, 2, 2))])
        self.batchnorm = nn.BatchNorm2d(channels[3], momentum=0.01)
        self.relu = act()
        self.logits = nn.Linear(channels[3], num_classes)

    def forward(self, x):
        out = self.layer(self.init_conv(self.normalize(x)))
        out = self.relu(self.batchnorm(out))
        out = F.avg_pool2d(out, out.shape[-1])
        return self.logits(out.flatten(1))


# Registry name (mtard_tf.models.architectures) -> module class; its constructor takes the spec's arguments by name.
ARCHITECTURES = {
    "resnet18": KuangliuResNet18,
    "resnet56": CifarResNet,
    "cifar_resnet": CifarResNet,
    "wrn34_10": TradesWideResNet,
    "wide_resnet": TradesWideResNet,
    "mobilenetv2": KuangliuMobileNetV2,
    "dm_wrn": DMWideResNet,
}


def build_torch_model(spec, num_classes=10):
    """The PyTorch module named by a model spec of mtard_tf.models.architectures (e.g. "wrn34_10:depth=10,widen=2")."""
    name, arguments = architectures.model_arguments(spec)
    return ARCHITECTURES[name](num_classes=num_classes, **arguments)
