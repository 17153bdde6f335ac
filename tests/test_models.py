"""Tests of the model registry (mtard_tf/models/architectures.py)."""

import numpy as np
import pytest
import keras

from mtard_tf.models import architectures

TINY_SPECS = [
    "resnet18:width=4,blocks=1",
    "resnet56:depth=8,width=4",
    "cifar_resnet:depth=8,width=4",
    "wrn34_10:depth=10,widen=1",
    "wide_resnet:depth=10,widen=1",
    "mobilenetv2:width_multiplier=0.25,max_blocks=1",
    "dm_wrn:depth=10,width=1",
]


def _images(batch=2, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (batch, size, size, 3)).astype(np.float32)


def _np(tensor):
    return keras.ops.convert_to_numpy(tensor)


def _trainable_parameters(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_available_models():
    assert architectures.available_models() == sorted(
        ["resnet18", "resnet56", "cifar_resnet", "wrn34_10", "wide_resnet", "mobilenetv2", "dm_wrn"])


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_tiny_model_builds_saves_and_reloads(spec, tmp_path):
    model = architectures.build_model(spec, num_classes=7)
    assert model.name == spec.split(":")[0]
    x = _images()
    logits = model(x, training=False)
    assert tuple(logits.shape) == (2, 7)
    assert logits.dtype == "float32"
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(_np(reloaded(x, training=False)), _np(logits))


def test_input_shape_and_class_count():
    model = architectures.build_model("resnet18:width=2,blocks=1", num_classes=100, input_shape=(16, 16, 3))
    assert tuple(model.input_shape) == (None, 16, 16, 3)
    assert tuple(model(_images(size=16)).shape) == (2, 100)


def test_stride_two_convolutions_pad_symmetrically():
    model = architectures.build_model("resnet18:width=2,blocks=1", num_classes=10)
    names = {layer.name for layer in model.layers}
    assert {"layer2_0_conv1_pad", "layer3_0_conv1_pad", "layer4_0_conv1_pad"} <= names
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and layer.strides != (1, 1):
            assert layer.padding == "valid", layer.name
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.epsilon == pytest.approx(1e-5) and layer.momentum == pytest.approx(0.9)


def test_sync_batchnorm_flag():
    plain = architectures.build_model("resnet56:depth=8,width=2", 10)
    synced = architectures.build_model("resnet56:depth=8,width=2", 10, sync_batchnorm=True)
    bn = [l for l in plain.layers if isinstance(l, keras.layers.BatchNormalization)]
    bn_sync = [l for l in synced.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bn and len(bn) == len(bn_sync)
    assert not any(l.synchronized for l in bn) and all(l.synchronized for l in bn_sync)


def test_wide_resnet_has_no_sub_block():
    model = architectures.build_model("wrn34_10:depth=10,widen=1", 10)
    assert not any("sub_block" in layer.name for layer in model.layers)
    assert any(layer.name.startswith("block3_layer_0") for layer in model.layers)


def test_dm_wide_resnet_layers():
    """Stride-2 3x3 convs padded bottom/right only, BatchNorm momentum 0.99, swish, DeepMind's CIFAR-10 statistics."""
    model = architectures.build_model("dm_wrn:depth=10,width=2", 10)
    layers = {layer.name: layer for layer in model.layers}
    for name in ("layer_1_block_0_conv__0_pad", "layer_2_block_0_conv__0_pad"):
        assert layers[name].padding == ((0, 1), (0, 1))
    assert layers["layer_1_block_0_conv__0"].padding == "valid" and layers["layer_0_block_0_conv__0"].padding == "same"
    assert all(layer.momentum == pytest.approx(0.99) and layer.epsilon == pytest.approx(1e-5)
               for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert layers["layer_0_block_0_relu__0"].get_config()["activation"] == "silu"
    mean, std = architectures.DM_NORMALIZATION_PRESETS["cifar10"]
    np.testing.assert_allclose(layers["normalize"].get_config()["variance"], np.square(std), rtol=1e-6)
    np.testing.assert_allclose(layers["normalize"].get_config()["mean"], mean, rtol=1e-6)
    relu = architectures.build_model("dm_wrn:depth=10,width=2,activation=relu,normalize=none", 10)
    assert isinstance(relu.get_layer("relu"), keras.layers.ReLU)
    assert "normalize" not in {layer.name for layer in relu.layers}


def test_normalize_layer(tmp_path):
    plain = architectures.build_model("resnet18:width=2,blocks=1", 10)
    normed = architectures.build_model("resnet18:width=2,blocks=1,normalize=cifar10", 10)
    assert "normalize" in {layer.name for layer in normed.layers}
    assert "normalize" not in {layer.name for layer in plain.layers}
    normed.set_weights(plain.get_weights())
    mean, std = architectures.NORMALIZATION_PRESETS["cifar10"]
    x = _images()
    expected = _np(plain((x - np.array(mean, np.float32)) / np.array(std, np.float32)))
    np.testing.assert_allclose(_np(normed(x)), expected, atol=1e-5)
    path = str(tmp_path / "normed.keras")
    normed.save(path)
    np.testing.assert_array_equal(_np(keras.models.load_model(path)(x)), _np(normed(x)))
    custom = architectures.build_model("resnet18:width=2,blocks=1,normalize=0.5/0.5/0.5/0.25/0.25/0.25", 10)
    custom.set_weights(plain.get_weights())
    np.testing.assert_allclose(_np(custom(x)), _np(plain((x - 0.5) / 0.25)), atol=1e-5)


@pytest.mark.parametrize("spec,expected", [
    ("resnet18", ("resnet18", {})),
    ("resnet18:width=8,blocks=1", ("resnet18", {"width": 8, "blocks": 1})),
    (" mobilenetv2 : width_multiplier = 0.5 ", ("mobilenetv2", {"width_multiplier": 0.5})),
    ("wrn34_10:depth=10,widen=2,", ("wrn34_10", {"depth": 10, "widen": 2})),
    ("resnet56:normalize=cifar10", ("resnet56", {"normalize": "cifar10"})),
])
def test_parse_model_spec(spec, expected):
    assert architectures.parse_model_spec(spec) == expected


@pytest.mark.parametrize("spec,message", [
    ("resnet19", "unknown model 'resnet19'"),
    ("", "empty model spec"),
    ("resnet18:depth=3", "unknown argument 'depth'"),
    ("resnet18:width", "expected key=value"),
    ("resnet18:width=4,width=8", "given twice"),
])
def test_parse_model_spec_rejects(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        architectures.parse_model_spec(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", [
    "resnet18:width=abc", "resnet18:width=2.5", "resnet56:depth=10", "wrn34_10:depth=12",
    "mobilenetv2:width_multiplier=-1", "resnet18:normalize=imagenet", "dm_wrn:depth=12", "dm_wrn:activation=gelu",
    "dm_wrn:width=0",
])
def test_build_model_rejects_bad_values(spec):
    with pytest.raises(ValueError):
        architectures.model_arguments(spec)
    with pytest.raises(ValueError):
        architectures.build_model(spec, 10)


@pytest.mark.parametrize("spec,expected", [
    ("resnet18:width=8", ("resnet18", {"width": 8, "blocks": 2, "normalize": None})),
    ("resnet56:depth=14", ("resnet56", {"depth": 14, "width": 16, "normalize": None})),
    ("wrn34_10:depth=10,widen=2", ("wrn34_10", {"depth": 10, "widen": 2, "normalize": None})),
    ("mobilenetv2:width_multiplier=1", ("mobilenetv2", {"width_multiplier": 1.0, "max_blocks": 0, "normalize": None})),
    ("resnet56:normalize=cifar10", ("resnet56", {"depth": 56, "width": 16,
                                                 "normalize": architectures.NORMALIZATION_PRESETS["cifar10"]})),
    ("dm_wrn", ("dm_wrn", {"depth": 70, "width": 16, "activation": "swish",
                           "normalize": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))})),
    ("dm_wrn:normalize=cifar100", ("dm_wrn", {"depth": 70, "width": 16, "activation": "swish",
                                              "normalize": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))})),
    ("dm_wrn:normalize=none", ("dm_wrn", {"depth": 70, "width": 16, "activation": "swish", "normalize": None})),
])
def test_model_arguments_fill_in_the_defaults(spec, expected):
    assert architectures.model_arguments(spec) == expected


@pytest.mark.parametrize("spec,expected", [
    ("resnet18", 11_173_962),       # kuangliu ResNet18, CIFAR-10: 11.17M
    ("wrn34_10", 46_160_474),       # TRADES WRN-34-10 without the unused sub_block1: 46.16M
    ("resnet56", 855_770),          # ResNet-56 with 1x1-conv projection shortcuts: 0.86M (0.85M with option A)
    ("mobilenetv2", 2_296_922),     # kuangliu MobileNetV2, CIFAR-10: 2.30M
])
def test_full_size_parameter_counts(spec, expected):
    model = architectures.build_model(spec, num_classes=10)
    assert _trainable_parameters(model) == expected


def _wide_resnet_parameters(depth, widen, num_classes):
    """Trainable parameters of a pre-activation WRN-depth-widen: 3x3 stem to 16, per block BN + 3x3 conv, BN + 3x3 conv
    (+ 1x1 projection where the width changes), final BN and Dense."""
    total, in_planes = 27 * 16, 16
    for planes in (16 * widen, 32 * widen, 64 * widen):
        for _ in range((depth - 4) // 6):
            total += 2 * in_planes + 9 * in_planes * planes + 2 * planes + 9 * planes * planes
            total += in_planes * planes if in_planes != planes else 0
            in_planes = planes
    return total + 2 * in_planes + (in_planes + 1) * num_classes


def test_full_size_dm_wrn_70_16_parameter_count():
    """266.8M at full size (Gowal et al. 2020: 267M), by the formula that small built models are checked against
    (building the full model takes ~20 s and 1 GB; built once, it had 266,888,756 trainable weights at 100 classes)."""
    assert _wide_resnet_parameters(34, 10, 10) == 46_160_474  # the TRADES WRN-34-10 count built above
    for spec, depth, width in (("dm_wrn:depth=10,width=1", 10, 1), ("dm_wrn:depth=16,width=2", 16, 2)):
        assert _trainable_parameters(architectures.build_model(spec, num_classes=100)) == _wide_resnet_parameters(
            depth, width, 100)
    assert _wide_resnet_parameters(70, 16, 10) == 266_796_506
    assert _wide_resnet_parameters(70, 16, 100) == 266_888_756


def test_mixed_precision_logits_are_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = architectures.build_model("resnet18:width=2,blocks=1", 10)
        logits = model(_images(), training=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert logits.dtype == "float32"
    conv = next(l for l in model.layers if isinstance(l, keras.layers.Conv2D))
    assert conv.compute_dtype == "float16"


def test_synchronized_batchnorm_runs_in_training_mode():
    model = architectures.build_model("resnet56:depth=8,width=2", 10, sync_batchnorm=True)
    before = [w.numpy().copy() for w in model.non_trainable_weights]
    assert tuple(model(_images(), training=True).shape) == (2, 10)
    after = [w.numpy() for w in model.non_trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
