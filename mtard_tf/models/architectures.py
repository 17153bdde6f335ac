"""Model registry: the students and teachers of the paper (ResNet-18, MobileNetV2, CIFAR ResNet-56,
WideResNet-34-10, DeepMind's WideResNet-70-16) as Keras functional models.

A model is named by a spec string, `NAME` or `NAME:key=value,key=value` (values are parsed as int, then float,
then kept as a string), e.g. `resnet18`, `resnet18:width=8,blocks=1`, `cifar_resnet:depth=20`,
`wrn34_10:depth=10,widen=1`, `mobilenetv2:width_multiplier=0.25`, `dm_wrn:normalize=cifar100`. Library code
receives the spec string; it never reads flags.

Every model maps float32 images in [0, 1] of `input_shape` to float32 logits [B, num_classes]. The models are built
from built-in Keras layers only, so `model.save("x.keras")` / `keras.models.load_model("x.keras")` need no custom
objects. They reproduce the PyTorch definitions the published checkpoints were trained with, numerically:

* `resnet18`: the CIFAR ResNet-18 of kuangliu/pytorch-cifar (as used by RSLAD / MTARD students).
* `resnet56` / `cifar_resnet`: the CIFAR ResNet of chenyaofo/pytorch-cifar-models, which is the definition the
  MTARD reference code uses for its clean ResNet-56 teacher: He et al.'s 16-32-64 network with torchvision-style
  BasicBlocks and a 1x1 conv + BN projection shortcut ("option B") where the shape changes.
* `wrn34_10` / `wide_resnet`: the TRADES WideResNet (yaodongyu/TRADES models/wideresnet.py), pre-activation
  blocks. The TRADES module also defines an unused `sub_block1`; it is not part of this model (the importer
  ignores its tensors).
* `mobilenetv2`: the CIFAR MobileNetV2 of kuangliu/pytorch-cifar (ReLU, stride-1 stem, 1x1 conv to 1280).
* `dm_wrn`: the WideResNet of Gowal et al. 2020, "Uncovering the limits of adversarial training against
  norm-bounded adversarial examples", whose WRN-70-16 is the paper's CIFAR-100 robust teacher, as published in
  PyTorch (RobustBench robustbench/model_zoo/architectures/dm_wide_resnet.py DMWideResNet; deepmind-research
  adversarial_robustness/pytorch/model_zoo.py): the blocks of the TRADES WideResNet with swish (or ReLU)
  activations, other module names, stride-2 convs padded at the bottom / right only, and the input normalisation
  inside the model. Defaults: `depth=70,width=16,activation=swish`, the published WRN-70-16s, and
  `normalize=cifar10`, DMWideResNet's own default; a CIFAR-100 checkpoint needs `normalize=cifar100`.

PyTorch compatibility: 3x3 convolutions with stride 2 pad symmetrically (`ZeroPadding2D(1)` + a "valid" conv, as
PyTorch's padding=1 does; Keras "same" would pad only bottom/right; `dm_wrn` pads bottom/right as its reference),
BatchNormalization(epsilon=1e-5, momentum=0.9) (PyTorch's eps=1e-5, momentum=0.1; `dm_wrn`: momentum=0.99, the
decay of DeepMind's training code), and the layer order of the PyTorch code. Keras layer names are the PyTorch
module paths with "_" doubled, then "." replaced by "_" (e.g. `layer2_0_shortcut_0`, and `layer_0_block_0_conv__0`
for `layer.0.block.0.conv_0`), which is what `mtard_tf.pytorch.importer` relies on.

Input normalisation: none by default (the paper's checkpoints take [0, 1] inputs), except in `dm_wrn`. A checkpoint
trained on normalised inputs (e.g. chenyaofo's pretrained ResNet-56) is used with the `normalize` kwarg, which puts
a `keras.layers.Normalization` with fixed mean/variance right after the input: `normalize=cifar10` or
`normalize=cifar100` (the statistics the architecture's published checkpoints were trained with: chenyaofo's, CIFAR-10
std 0.2023/0.1994/0.2010; for `dm_wrn` DeepMind's, CIFAR-10 std 0.2471/0.2435/0.2616), `normalize=none`, or six
numbers `m0/m1/m2/s0/s1/s2` (per-channel mean, then per-channel std).

Mixed precision: the classifier is a float32 Dense, so the logits are float32 under a "mixed_float16" policy.
"""

import keras

from mtard_tf.errors import UserError


class ModelSpecError(UserError, ValueError):
    """A model spec (NAME:key=value,...) or model argument that cannot build a model."""


# Per-channel (mean, std) of the published normalised training pipelines (chenyaofo/pytorch-cifar-models).
NORMALIZATION_PRESETS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761)),
}
# DeepMind's (CIFAR10_MEAN / CIFAR10_STD, CIFAR100_MEAN / CIFAR100_STD of RobustBench
# robustbench/model_zoo/architectures/dm_wide_resnet.py): the per-pixel std of the training images.
DM_NORMALIZATION_PRESETS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
# Haiku's BatchNorm(decay_rate=0.99) of DeepMind's training code (deepmind-research adversarial_robustness/jax/
# model_zoo.py), PyTorch's momentum=0.01. Their PyTorch port keeps PyTorch's default, which matters only in training.
DM_BN_MOMENTUM = 0.99


def resolve_normalization(normalize, presets=None):
    """None / "none" -> None; a name of `presets` (default NORMALIZATION_PRESETS) or "m0/m1/m2/s0/s1/s2" or a
    (mean, std) pair -> (mean, std) tuples."""
    presets = NORMALIZATION_PRESETS if presets is None else presets
    if normalize is None:
        return None
    if isinstance(normalize, str):
        text = normalize.strip().lower()
        if text in ("", "none", "false", "0"):
            return None
        if text in presets:
            return presets[text]
        parts = text.split("/")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) != 6 or any(s <= 0 for s in numbers[3:]):
            raise ModelSpecError(
                f"normalize={normalize!r}: expected none, {', '.join(sorted(presets))} or six numbers "
                "m0/m1/m2/s0/s1/s2 (positive stds)")
        return tuple(numbers[:3]), tuple(numbers[3:])
    mean, std = normalize
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class _Builder:
    """Small helpers that create layers named after the PyTorch module paths."""

    def __init__(self, sync_batchnorm, bn_momentum=BN_MOMENTUM):
        self.sync_batchnorm = sync_batchnorm
        self.bn_momentum = bn_momentum

    @staticmethod
    def name(path):
        """The Keras name of a PyTorch module path: "_" doubled, then "." -> "_" (import_torch.torch_path inverts
        it)."""
        return path.replace("_", "__").replace(".", "_")

    def conv(self, x, path, filters, kernel_size, stride=1, use_bias=False, stride_padding=None):
        """nn.Conv2d(kernel_size, stride, padding=kernel_size // 2) with PyTorch's symmetric padding; a strided conv
        is padded by `stride_padding` (a ZeroPadding2D padding) instead if given."""
        padding = "valid"
        if kernel_size > 1:
            if stride == 1:
                padding = "same"  # symmetric for odd kernels at stride 1
            else:
                pad = kernel_size // 2 if stride_padding is None else stride_padding
                x = keras.layers.ZeroPadding2D(pad, name=self.name(path) + "_pad")(x)
        elif stride > 1:
            # A 1x1 conv of stride s reads x[:, ::s, ::s] only: subsample first, then a 1x1 conv of stride 1. Same
            # function, same kernel (imported and saved weights are unchanged), but it keeps the model away from
            # oneDNN's filter gradient of a strided 1x1 conv, which corrupts memory on narrow inputs of 56x56 and
            # more (TF 2.21; docs/onednn_strided_1x1_crash.py reproduces it).
            x = keras.layers.MaxPooling2D(1, strides=stride, name=self.name(path) + "_subsample")(x)
            stride = 1
        return keras.layers.Conv2D(
            filters, kernel_size, strides=stride, padding=padding, use_bias=use_bias,
            kernel_initializer="he_normal", name=self.name(path))(x)

    def depthwise(self, x, path, stride=1):
        """nn.Conv2d(C, C, 3, stride, padding=1, groups=C, bias=False)."""
        padding = "same"
        if stride != 1:
            x = keras.layers.ZeroPadding2D(1, name=self.name(path) + "_pad")(x)
            padding = "valid"
        return keras.layers.DepthwiseConv2D(
            3, strides=stride, padding=padding, use_bias=False, depthwise_initializer="he_normal",
            name=self.name(path))(x)

    def bn(self, x, path):
        return keras.layers.BatchNormalization(
            epsilon=BN_EPSILON, momentum=self.bn_momentum, synchronized=self.sync_batchnorm, name=self.name(path))(x)

    def relu(self, x, name):
        return keras.layers.ReLU(name=self.name(name))(x)

    def activation(self, x, name, kind):
        """`kind` "relu", or "swish": x * sigmoid(x) (Keras' and PyTorch's silu)."""
        if kind == "relu":
            return self.relu(x, name)
        return keras.layers.Activation("silu", name=self.name(name))(x)

    def add(self, a, b, name):
        return keras.layers.Add(name=self.name(name))([a, b])

    def head(self, x, path, num_classes, pool_name="avgpool"):
        x = keras.layers.GlobalAveragePooling2D(name=pool_name)(x)
        return keras.layers.Dense(num_classes, dtype="float32", name=self.name(path))(x)


def _inputs(input_shape, normalize):
    inputs = keras.Input(shape=tuple(input_shape), dtype="float32", name="images")
    x = inputs
    stats = resolve_normalization(normalize)
    if stats is not None:
        mean, std = stats
        if len(mean) != input_shape[-1]:
            raise ModelSpecError(f"normalize has {len(mean)} channels, the input has {input_shape[-1]}")
        x = keras.layers.Normalization(
            axis=-1, mean=list(mean), variance=[s * s for s in std], name="normalize")(x)
    return inputs, x


def _positive_int(value, what):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelSpecError(f"{what} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# ResNet-18 (kuangliu/pytorch-cifar)


def _basic_block_resnet(name, num_classes, input_shape, sync_batchnorm, normalize, width, blocks, multipliers,
                        shortcut, head):
    """Post-activation BasicBlock ResNet: 3x3 stem, stages of width w * multiplier (stride 1 then 2), 1x1 conv + BN
    shortcut where the shape changes (named `shortcut` in kuangliu's ResNet-18, `downsample` in chenyaofo's CIFAR
    ResNets), global average pool and the `head` Dense."""
    b = _Builder(sync_batchnorm)
    inputs, x = _inputs(input_shape, normalize)
    x = b.conv(x, "conv1", width, 3)
    x = b.relu(b.bn(x, "bn1"), "relu")
    in_planes = width
    for stage, multiplier in enumerate(multipliers, start=1):
        planes = width * multiplier
        for index in range(blocks):
            stride = 2 if index == 0 and stage > 1 else 1
            p = f"layer{stage}.{index}"
            out = b.conv(x, p + ".conv1", planes, 3, stride)
            out = b.relu(b.bn(out, p + ".bn1"), p + ".relu1")
            out = b.conv(out, p + ".conv2", planes, 3)
            out = b.bn(out, p + ".bn2")
            identity = x
            if stride != 1 or in_planes != planes:
                identity = b.conv(x, f"{p}.{shortcut}.0", planes, 1, stride)
                identity = b.bn(identity, f"{p}.{shortcut}.1")
            x = b.relu(b.add(out, identity, p + ".add"), p + ".relu2")
            in_planes = planes
    outputs = b.head(x, head, num_classes)
    return keras.Model(inputs, outputs, name=name)


def _check_resnet18(width, blocks, normalize):
    _positive_int(width, "width")
    _positive_int(blocks, "blocks")


def _resnet18(name, num_classes, input_shape, sync_batchnorm, width=64, blocks=2, normalize=None):
    return _basic_block_resnet(name, num_classes, input_shape, sync_batchnorm, normalize, width, blocks,
                               multipliers=(1, 2, 4, 8), shortcut="shortcut", head="linear")


# ---------------------------------------------------------------------------------------------------------------
# CIFAR ResNet-20/32/44/56/... (He et al. 2016; chenyaofo/pytorch-cifar-models definition, as in MTARD)


def _check_cifar_resnet(depth, width, normalize):
    _positive_int(depth, "depth")
    _positive_int(width, "width")
    if depth < 8 or (depth - 2) % 6:
        raise ModelSpecError(f"cifar_resnet depth must be 6n+2 with n >= 1 (8, 20, 32, 44, 56, 110, ...), got {depth}")


def _cifar_resnet(name, num_classes, input_shape, sync_batchnorm, depth=56, width=16, normalize=None):
    blocks = (depth - 2) // 6
    return _basic_block_resnet(name, num_classes, input_shape, sync_batchnorm, normalize, width, blocks,
                               multipliers=(1, 2, 4), shortcut="downsample", head="fc")


# ---------------------------------------------------------------------------------------------------------------
# Pre-activation WideResNets (Zagoruyko & Komodakis 2016): depth 6n+4, three groups of n blocks of width 16 * widen,
# 32 * widen, 64 * widen. The TRADES WideResNet (yaodongyu/TRADES models/wideresnet.py) and DeepMind's (RobustBench
# robustbench/model_zoo/architectures/dm_wide_resnet.py) compute the same blocks; they differ in module names,
# activation, stride-2 padding and BatchNorm momentum.

# Module names of a block ("{group}" counts from 0, "{stage}" from 1) and of the network around the blocks.
_TRADES_WRN_NAMES = {
    "stem": "conv1", "block": "block{stage}.layer.{index}", "bn_0": "bn1", "act_0": "relu1", "conv_0": "conv1",
    "bn_1": "bn2", "act_1": "relu2", "conv_1": "conv2", "shortcut": "convShortcut", "bn": "bn1", "head": "fc",
}
_DM_WRN_NAMES = {
    "stem": "init_conv", "block": "layer.{group}.block.{index}", "bn_0": "batchnorm_0", "act_0": "relu_0",
    "conv_0": "conv_0", "bn_1": "batchnorm_1", "act_1": "relu_1", "conv_1": "conv_1", "shortcut": "shortcut",
    "bn": "batchnorm", "head": "logits",
}


def _preact_wide_resnet(name, num_classes, input_shape, builder, normalize, depth, widen, names, activation,
                        stride_padding=None):
    """Block: a = act(bn_0(x)); out = conv_1(act(bn_1(conv_0(a)))); out + (x, or the 1x1 projection of a where the
    width changes). Then act(bn(x)), global average pool and the `head` Dense."""
    b = builder
    n = (depth - 4) // 6
    inputs, x = _inputs(input_shape, normalize)
    x = b.conv(x, names["stem"], 16, 3)
    in_planes = 16
    for group, (out_planes, first_stride) in enumerate(zip((16 * widen, 32 * widen, 64 * widen), (1, 2, 2))):
        for index in range(n):
            stride = first_stride if index == 0 else 1
            p = names["block"].format(group=group, stage=group + 1, index=index) + "."
            activated = b.activation(b.bn(x, p + names["bn_0"]), p + names["act_0"], activation)
            out = b.conv(activated, p + names["conv_0"], out_planes, 3, stride, stride_padding=stride_padding)
            out = b.activation(b.bn(out, p + names["bn_1"]), p + names["act_1"], activation)
            out = b.conv(out, p + names["conv_1"], out_planes, 3)
            if in_planes == out_planes:
                shortcut = x
            else:  # the projection sees the pre-activated input, as in both references
                shortcut = b.conv(activated, p + names["shortcut"], out_planes, 1, stride)
            x = b.add(shortcut, out, p + "add")
            in_planes = out_planes
    x = b.activation(b.bn(x, names["bn"]), "relu", activation)
    outputs = b.head(x, names["head"], num_classes)
    return keras.Model(inputs, outputs, name=name)


def _check_depth_6n_plus_4(name, depth):
    if depth < 10 or (depth - 4) % 6:
        raise ModelSpecError(f"{name} depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ..., 70), got {depth}")


def _check_wide_resnet(depth, widen, normalize):
    _positive_int(depth, "depth")
    _positive_int(widen, "widen")
    _check_depth_6n_plus_4("wide_resnet", depth)


def _wide_resnet(name, num_classes, input_shape, sync_batchnorm, depth=34, widen=10, normalize=None):
    """The TRADES WideResNet. Its module also defines a `sub_block1` that forward() never calls; it is not built."""
    return _preact_wide_resnet(name, num_classes, input_shape, _Builder(sync_batchnorm), normalize, depth, widen,
                               _TRADES_WRN_NAMES, "relu")


_DM_ACTIVATIONS = ("relu", "swish")


def _check_dm_wide_resnet(depth, width, activation, normalize):
    _positive_int(depth, "depth")
    _positive_int(width, "width")
    _check_depth_6n_plus_4("dm_wrn", depth)
    if activation not in _DM_ACTIVATIONS:
        raise ModelSpecError(f"dm_wrn activation must be one of {', '.join(_DM_ACTIVATIONS)}, got {activation!r}")


def _dm_wide_resnet(name, num_classes, input_shape, sync_batchnorm, depth=70, width=16, activation="swish",
                    normalize="cifar10"):
    """DeepMind's WideResNet. Its stride-2 conv_0 sees F.pad(x, (0, 1, 0, 1)): one zero row and column at the bottom
    and right (TensorFlow's SAME on even sizes), where PyTorch's padding=1 pads all sides. On an odd size that conv
    gives (n - 1) / 2 rows and the 1x1 shortcut (n + 1) / 2, which cannot be added (the reference fails alike): both
    stride-2 groups need even sizes, so the input's height and width must be multiples of 4."""
    if any(size is not None and size % 4 for size in input_shape[:2]):
        raise ModelSpecError(f"dm_wrn needs an input height and width that are multiples of 4 (its stride-2 "
                             f"convolutions pad only the bottom and right), got {input_shape[0]}x{input_shape[1]}")
    return _preact_wide_resnet(name, num_classes, input_shape, _Builder(sync_batchnorm, DM_BN_MOMENTUM), normalize,
                               depth, width, _DM_WRN_NAMES, activation, stride_padding=((0, 1), (0, 1)))


# ---------------------------------------------------------------------------------------------------------------
# MobileNetV2 for CIFAR (kuangliu/pytorch-cifar)

_MOBILENETV2_CFG = (  # (expansion, out_planes, num_blocks, stride)
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _check_mobilenetv2(width_multiplier, max_blocks, normalize):
    if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, (int, float)) or width_multiplier <= 0:
        raise ModelSpecError(f"width_multiplier must be a positive number, got {width_multiplier!r}")
    if not isinstance(max_blocks, int) or isinstance(max_blocks, bool) or max_blocks < 0:
        raise ModelSpecError(f"max_blocks must be a non-negative integer (0: no cap), got {max_blocks!r}")


def _mobilenetv2(name, num_classes, input_shape, sync_batchnorm, width_multiplier=1.0, max_blocks=0,
                 normalize=None):
    def scaled(channels):
        return max(1, int(round(channels * width_multiplier)))

    b = _Builder(sync_batchnorm)
    inputs, x = _inputs(input_shape, normalize)
    x = b.conv(x, "conv1", scaled(32), 3)
    x = b.relu(b.bn(x, "bn1"), "relu1")
    in_planes = scaled(32)
    index = 0
    for expansion, out_planes, num_blocks, first_stride in _MOBILENETV2_CFG:
        out_planes = scaled(out_planes)
        if max_blocks:
            num_blocks = min(num_blocks, max_blocks)
        for block in range(num_blocks):
            stride = first_stride if block == 0 else 1
            p = f"layers.{index}"
            planes = expansion * in_planes
            out = b.conv(x, p + ".conv1", planes, 1)
            out = b.relu(b.bn(out, p + ".bn1"), p + ".relu1")
            out = b.depthwise(out, p + ".conv2", stride)
            out = b.relu(b.bn(out, p + ".bn2"), p + ".relu2")
            out = b.conv(out, p + ".conv3", out_planes, 1)
            out = b.bn(out, p + ".bn3")
            if stride == 1:
                shortcut = x
                if in_planes != out_planes:
                    shortcut = b.conv(x, p + ".shortcut.0", out_planes, 1)
                    shortcut = b.bn(shortcut, p + ".shortcut.1")
                out = b.add(out, shortcut, p + ".add")
            x = out
            in_planes = out_planes
            index += 1
    x = b.conv(x, "conv2", scaled(1280), 1)
    x = b.relu(b.bn(x, "bn2"), "relu2")
    outputs = b.head(x, "linear", num_classes)
    return keras.Model(inputs, outputs, name=name)


# ---------------------------------------------------------------------------------------------------------------
# Registry

# name -> (constructor, default kwargs, check of the kwargs, normalisation presets). The defaults also define which
# kwargs a name accepts and their types; the check raises ModelSpecError on values no model of that name has; the
# presets are what `normalize=cifar10` / `cifar100` mean for that architecture.
_REGISTRY = {
    "resnet18": (_resnet18, {"width": 64, "blocks": 2, "normalize": None}, _check_resnet18, NORMALIZATION_PRESETS),
    "resnet56": (_cifar_resnet, {"depth": 56, "width": 16, "normalize": None}, _check_cifar_resnet,
                 NORMALIZATION_PRESETS),
    "cifar_resnet": (_cifar_resnet, {"depth": 56, "width": 16, "normalize": None}, _check_cifar_resnet,
                     NORMALIZATION_PRESETS),
    "wrn34_10": (_wide_resnet, {"depth": 34, "widen": 10, "normalize": None}, _check_wide_resnet,
                 NORMALIZATION_PRESETS),
    "wide_resnet": (_wide_resnet, {"depth": 34, "widen": 10, "normalize": None}, _check_wide_resnet,
                    NORMALIZATION_PRESETS),
    "mobilenetv2": (_mobilenetv2, {"width_multiplier": 1.0, "max_blocks": 0, "normalize": None}, _check_mobilenetv2,
                    NORMALIZATION_PRESETS),
    "dm_wrn": (_dm_wide_resnet, {"depth": 70, "width": 16, "activation": "swish", "normalize": "cifar10"},
               _check_dm_wide_resnet, DM_NORMALIZATION_PRESETS),
}


def available_models():
    """The registered model names, sorted.

    Returns:
      A list of names, each usable as a `build_model` spec (with key=value options: "resnet18:width=16").

    Example:

    >>> "resnet18" in mtard_tf.available_models()
    True
    """
    return sorted(_REGISTRY)


def _parse_value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_model_spec(spec):
    """"resnet18:width=8,blocks=1" -> ("resnet18", {"width": 8, "blocks": 1}); ValueError on a bad spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec {spec!r}; available models: {', '.join(available_models())}")
    name, _, arguments = spec.strip().partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        raise ModelSpecError(f"unknown model {name!r} in spec {spec!r}; available models: {', '.join(available_models())}")
    defaults = _REGISTRY[name][1]
    kwargs = {}
    for item in arguments.split(","):
        if not item.strip():
            continue
        key, equals, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not equals or not key or not value:
            raise ModelSpecError(f"bad argument {item.strip()!r} in model spec {spec!r}: expected key=value")
        if key not in defaults:
            raise ModelSpecError(
                f"unknown argument {key!r} for model {name!r} in spec {spec!r}; allowed: {', '.join(sorted(defaults))}")
        if key in kwargs:
            raise ModelSpecError(f"argument {key!r} given twice in model spec {spec!r}")
        kwargs[key] = _parse_value(value)
    return name, kwargs


def _check_types(name, kwargs, spec):
    defaults = _REGISTRY[name][1]
    checked = {}
    for key, value in kwargs.items():
        default = defaults[key]
        if key == "normalize":
            value = str(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if default is not None and not isinstance(value, type(default)):
            raise ModelSpecError(
                f"argument {key}={value!r} for model {name!r} in spec {spec!r} must be {type(default).__name__}")
        checked[key] = value
    return checked


def model_arguments(spec):
    """"resnet56:depth=14" -> ("resnet56", {"depth": 14, "width": 16, "normalize": None}): every argument of the
    named architecture, the spec's (type-checked and validated) over the defaults, with `normalize` resolved to
    None or a (mean, std) pair by the architecture's presets. ModelSpecError on a bad spec.

    Any implementation of the registry's architectures (the Keras models here, mtard_tf.pytorch.modules) reads a spec
    through this function, so they accept the same specs.
    """
    name, kwargs = parse_model_spec(spec)
    _, defaults, check, presets = _REGISTRY[name]
    arguments = {**defaults, **_check_types(name, kwargs, spec)}
    check(**arguments)
    arguments["normalize"] = resolve_normalization(arguments["normalize"], presets)
    return name, arguments


def build_model(spec, num_classes, input_shape=(32, 32, 3), sync_batchnorm=False):
    """Builds the (uncompiled) Keras model named by `spec`, mapping [0, 1] images to float32 logits.

    Args:
      spec: NAME or NAME:key=value,... (available_models; docs/datasets.md lists each model's keys).
      num_classes: the number of logits.
      input_shape: (H, W, C) of the images; every model ends in global average pooling, so any size works.
      sync_batchnorm: synchronise BatchNorm statistics across replicas.

    Returns:
      A functional keras.Model.

    Example:

    >>> student = mtard_tf.build_model("resnet18:width=8", num_classes=10, input_shape=(32, 32, 3))
    >>> student.output_shape
    (None, 10)
    """
    name, arguments = model_arguments(spec)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelSpecError(f"num_classes must be a positive integer, got {num_classes!r}")
    constructor = _REGISTRY[name][0]
    return constructor(name, num_classes, tuple(input_shape), bool(sync_batchnorm), **arguments)


def with_dtype_policy(model, policy="float32"):
    """`model` computing under the Keras dtype `policy`, with the same (float32) weights: `model` itself when every
    layer has that policy already, else a clone. A model trained under mixed_bfloat16 is saved with bf16 layers, and
    would otherwise be evaluated (attack gradients included) and served in 16 bits."""
    if all(layer.dtype_policy.name == policy for layer in model.layers):
        return model

    def clone_layer(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": policy})

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    clone.trainable = model.trainable
    return clone

