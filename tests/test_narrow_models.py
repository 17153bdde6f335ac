"""Narrow networks on large images train without a native crash (oneDNN's strided 1x1 filter gradient corrupted
memory for them: docs/onednn_strided_1x1_crash.py), and the strided 1x1 projection is the same function as before."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from support import ROOT
from mtard_tf.models import architectures

# Each of these died with a segmentation fault or "malloc(): corrupted top size" in its first training steps on
# 64x64 images while the projection was a 1x1 convolution of stride 2.
NARROW_SPECS = [
    "resnet18:width=1,blocks=1", "resnet18:width=2,blocks=1", "resnet18:width=4,blocks=1", "resnet18:width=8,blocks=1",
    "wrn34_10:depth=10,widen=1", "mobilenetv2:width_multiplier=0.25,max_blocks=1", "cifar_resnet:depth=8,width=2",
    "dm_wrn:depth=10,width=1",
]

# Trains each (spec, image size, channels) a few SAT steps (PGD in the step: input and weight gradients) and prints
# one JSON line of losses. Runs in a subprocess: a native crash there is an exit status here, not a dead test run.
TRAIN_SCRIPT = """
import json, sys
import keras, numpy as np
from mtard_tf.methods import baselines
from mtard_tf.models import architectures
for spec, size, channels in json.loads(sys.argv[1]):
    model = architectures.build_model(spec, 10, (size, size, channels))
    trainer = baselines.AdversarialTrainer(model, method="pgd_at", attack_steps=2, eval_attack_steps=0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(8, size, size, channels)).astype("float32")
    history = trainer.fit(images, rng.integers(0, 10, 8), batch_size=4, epochs=1, verbose=0)
    print(json.dumps([spec, size, history.history["loss"]]), flush=True)
"""


def train_in_subprocess(configurations):
    result = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, json.dumps(configurations)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stderr[-3000:]}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]


def test_narrow_registry_models_train_on_64x64_images():
    configurations = [[spec, 64, 3] for spec in NARROW_SPECS] + [["resnet18:width=2,blocks=1", 96, 1]]
    trained = train_in_subprocess(configurations)
    assert [[spec, size] for spec, size, _ in trained] == [[spec, size] for spec, size, _ in configurations]
    for spec, size, losses in trained:
        assert losses and all(np.isfinite(losses)), (spec, size, losses)


def test_strided_projection_is_a_strided_1x1_convolution():
    model = architectures.build_model("resnet18:width=4,blocks=1", 10, (33, 33, 3))
    projection = model.get_layer("layer2_0_shortcut_0")
    assert projection.strides == (1, 1) and projection.kernel.shape == (1, 1, 4, 8)
    inputs = tf.random.normal([2, 33, 33, 4], seed=1)
    subsampled = model.get_layer("layer2_0_shortcut_0_subsample")(inputs)
    expected = tf.nn.conv2d(inputs, projection.kernel, strides=2, padding="VALID")
    np.testing.assert_array_equal(projection(subsampled).numpy(), expected.numpy())


@pytest.mark.parametrize("size", [33, 34])
def test_dm_wrn_refuses_sizes_its_padding_cannot_add(size):
    with pytest.raises(architectures.ModelSpecError, match="multiples of 4"):
        architectures.build_model("dm_wrn:depth=10,width=1", 10, (size, size, 3))


# A user's own models with a strided convolution of a 1x1 kernel (the crash's ops) on 64x64 images, trained through
# the trainers: Trainer repairs them in place (models/pointwise_strides.py). The grey-image model's depthwise,
# separable and transposed layers see one channel, where their oneDNN filter gradient crashes.
USER_SCRIPT = """
import json
import keras, numpy as np
from mtard_tf.methods import baselines

class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.stem = keras.layers.Conv2D(4, 3, padding="same", activation="relu")
        self.down = keras.layers.Conv2D(8, 1, strides=2)
        self.head = keras.layers.Dense(10)
    def call(self, x):
        return self.head(keras.ops.mean(self.down(self.stem(x)), axis=(1, 2)))

inputs = keras.Input((64, 64, 3))
x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
x = keras.layers.Conv2D(8, 1, strides=2, padding="same")(x)
functional = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x)))
grey = keras.Input((64, 64, 1))
x = keras.layers.Concatenate()([keras.layers.DepthwiseConv2D(1, strides=2, depth_multiplier=4)(grey),
                                keras.layers.SeparableConv2D(4, 1, strides=2, padding="same")(grey)])
up = keras.layers.Conv2DTranspose(4, 1, strides=2)(keras.layers.AveragePooling2D(2)(grey))
x = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(x), keras.layers.GlobalAveragePooling2D()(up)])
grey_model = keras.Model(grey, keras.layers.Dense(10)(x))
for name, model, channels in (("functional", functional, 3), ("subclassed", Subclassed(), 3), ("grey", grey_model, 1)):
    trainer = baselines.AdversarialTrainer(model, method="pgd_at", attack_steps=2, eval_attack_steps=0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(8, 64, 64, channels)).astype("float32")
    history = trainer.fit(images, rng.integers(0, 10, 8), batch_size=4, epochs=2, verbose=0)
    print(json.dumps([name, history.history["loss"]]), flush=True)
"""


def test_users_models_with_a_strided_1x1_convolution_train_on_64x64_images():
    result = subprocess.run([sys.executable, "-c", USER_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stderr[-3000:]}"
    trained = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    assert [name for name, _ in trained] == ["functional", "subclassed", "grey"]
    assert all(losses and np.isfinite(losses).all() for _, losses in trained)


# (layer factory, input shape) of every kind of layer the repair takes, odd and even sizes, both paddings.
layers = keras.layers
STRIDED_POINTWISE_LAYERS = [
    (lambda: layers.Conv1D(3, 1, strides=2, padding="causal"), (2, 35, 4)),
    (lambda: layers.Conv2D(3, 1, strides=2, padding="valid", bias_initializer="ones"), (2, 33, 33, 4)),
    (lambda: layers.Conv2D(3, 1, strides=2, padding="same", bias_initializer="ones"), (2, 34, 34, 4)),
    (lambda: layers.Conv2D(3, 1, strides=(2, 3), padding="same", bias_initializer="ones"), (2, 35, 34, 4)),
    (lambda: layers.Conv2D(3, 1, strides=2, data_format="channels_first"), (2, 4, 35, 35)),
    (lambda: layers.Conv3D(3, 1, strides=2), (2, 5, 9, 9, 2)),
    (lambda: layers.DepthwiseConv1D(1, strides=2, depth_multiplier=2, bias_initializer="ones"), (2, 34, 3)),
    (lambda: layers.DepthwiseConv2D(1, strides=2, depth_multiplier=2, use_bias=True, bias_initializer="ones",
                                    activation="tanh"), (2, 33, 33, 3)),
    (lambda: layers.DepthwiseConv2D(1, strides=2, padding="same", data_format="channels_first",
                                    bias_initializer="ones"), (2, 3, 34, 34)),
    (lambda: layers.SeparableConv1D(4, 1, strides=3, padding="same", bias_initializer="ones"), (2, 35, 3)),
    (lambda: layers.SeparableConv2D(4, 1, strides=2, padding="same", bias_initializer="ones",
                                    activation="relu"), (2, 34, 34, 1)),
    (lambda: layers.SeparableConv2D(4, 1, strides=2, data_format="channels_first"), (2, 3, 33, 33)),
    (lambda: layers.Conv1DTranspose(3, 1, strides=3, bias_initializer="ones"), (2, 9, 4)),
    (lambda: layers.Conv2DTranspose(3, 1, strides=2, padding="same", activation="relu"), (2, 9, 8, 4)),
    (lambda: layers.Conv2DTranspose(3, 1, strides=(3, 2), output_padding=(1, 0), bias_initializer="ones"),
     (2, 7, 8, 4)),
    (lambda: layers.Conv2DTranspose(2, 1, strides=2, padding="same", output_padding=1,
                                    data_format="channels_first"), (2, 3, 7, 7)),
    (lambda: layers.Conv3DTranspose(2, 1, strides=2), (2, 3, 4, 5, 2)),
]


@pytest.mark.parametrize("make_layer,shape", STRIDED_POINTWISE_LAYERS)
def test_the_repaired_layer_computes_the_strided_convolution_and_its_gradients(make_layer, shape):
    from mtard_tf.models import pointwise_strides
    inputs = tf.random.normal(shape, seed=2)
    reference, layer = make_layer(), make_layer()
    reference(inputs)
    layer(inputs)
    layer.set_weights(reference.get_weights())
    config = layer.get_config()
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(inputs)
        expected = reference(inputs)
    model = keras.Sequential([keras.Input(shape[1:]), layer])
    assert pointwise_strides.subsample_strided_pointwise_convs(model) == [layer.name]
    assert pointwise_strides.subsample_strided_pointwise_convs(model) == []  # once
    with tf.GradientTape(persistent=True) as repaired_tape:
        repaired_tape.watch(inputs)
        outputs = model(inputs)  # through Keras' __call__: fails if Keras stops calling the repaired method
    np.testing.assert_allclose(outputs.numpy(), expected.numpy(), atol=1e-5)
    for source, reference_source in [(inputs, inputs)] + list(zip(layer.trainable_weights,
                                                                  reference.trainable_weights)):
        np.testing.assert_allclose(repaired_tape.gradient(outputs, source).numpy(),
                                   tape.gradient(expected, reference_source).numpy(), rtol=1e-5, atol=1e-5)
    assert layer.get_config() == config  # saved as the layer it was


def test_only_strided_convolutions_with_a_kernel_of_ones_are_repaired():
    from mtard_tf.models import pointwise_strides
    untouched = [layers.Conv2D(3, 3, strides=2), layers.Conv2D(3, 1), layers.DepthwiseConv2D(3, strides=2),
                 layers.SeparableConv2D(3, (1, 3), strides=2), layers.Conv2DTranspose(3, 2, strides=2),
                 layers.Conv2DTranspose(3, 1), layers.MaxPooling2D(1, strides=2)]
    assert not any(pointwise_strides.is_strided_pointwise(layer) for layer in untouched)
