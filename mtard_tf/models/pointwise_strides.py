"""Keeps a user's model away from a native crash: strided 1x1 convolutions computed as a subsample and a 1x1
convolution of stride 1.

TensorFlow 2.21's oneDNN kernel for the filter gradient of a 1x1 convolution of stride 2 corrupts memory on narrow
inputs (even sizes of 56 and more, a few channels): the process dies with a segfault or "malloc(): corrupted top
size" during training (docs/onednn_strided_1x1_crash.py reproduces it; fine with TF_ENABLE_ONEDNN_OPTS=0, which must
be set before TensorFlow starts). The registry's architectures avoid the op when they are built
(models/architectures.py); a model a user brings is repaired here, in place, before it is trained.

A 1x1 convolution of stride s reads only x[:, ::s, ::s] (with "same" or "valid" padding alike: a 1x1 kernel needs no
padding), so each such keras.layers.Conv2D gets a convolution_op that subsamples, then convolves at stride 1: the
same function of the same kernel, the layer, its name, its weights and its saved config unchanged (a saved model
reloads as the plain Conv2D). The override is of an instance method that Keras' BaseConv.call calls;
tests/test_narrow_models.py fails if Keras stops calling it.
"""

import types

import keras
from keras import ops


def _subsampled_pointwise_conv(layer, inputs, kernel):
    """Keras' BaseConv.convolution_op for a 1x1 kernel of stride (sh, sw): x[:, ::sh, ::sw] convolved at stride 1."""
    stride_h, stride_w = layer.strides
    if layer.data_format == "channels_first":
        inputs = inputs[:, :, ::stride_h, ::stride_w]
    else:
        inputs = inputs[:, ::stride_h, ::stride_w, :]
    return ops.conv(inputs, kernel, strides=1, padding="valid", dilation_rate=layer.dilation_rate,
                    data_format=layer.data_format)


def is_strided_pointwise(layer):
    """A keras.layers.Conv2D with a 1x1 kernel and a stride above 1."""
    return (isinstance(layer, keras.layers.Conv2D) and tuple(layer.kernel_size) == (1, 1)
            and max(layer.strides) > 1 and tuple(layer.dilation_rate) == (1, 1))


def subsample_strided_pointwise_convs(model):
    """Gives every strided 1x1 Conv2D of `model` (functional, Sequential or subclassed, nested models included) the
    subsample-then-convolve convolution_op, in place. Returns the names of the layers changed.

    Example:

    >>> model = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Conv2D(4, 1, strides=2)])
    >>> subsample_strided_pointwise_convs(model)
    ['conv2d']
    """
    changed = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if is_strided_pointwise(layer) and "convolution_op" not in vars(layer):
            layer.convolution_op = types.MethodType(_subsampled_pointwise_conv, layer)
            changed.append(layer.name)
    return changed
