"""Keeps a user's model away from a native crash: strided 1x1 convolutions computed as a subsample and a 1x1
convolution of stride 1.

TensorFlow 2.21's oneDNN kernels for the filter gradient of a strided convolution with a kernel of ones corrupt
memory on some shapes, and the process dies with a segfault or "malloc(): corrupted top size" during training
(fine with TF_ENABLE_ONEDNN_OPTS=0, which must be set before TensorFlow starts). Seen for: Conv2D 1x1 of stride 2
(Conv2DBackpropFilter) on even sizes of 56 and more with a few channels (docs/onednn_strided_1x1_crash.py); Conv1D
of kernel 1 and stride 2 on sequences of 4096; DepthwiseConv2D and SeparableConv2D 1x1 of stride 2 on one input
channel (DepthwiseConv2dNativeBackpropFilter) at even sizes from 48; Conv2DTranspose 1x1 of stride 2 from 28x28
inputs (its kernel gradient is a Conv2DBackpropFilter); docs/reliability.md lists what was tried. The
registry's architectures avoid these ops when they are built (models/architectures.py); a model a user brings is
repaired here, in place, before it is trained.

A convolution with a kernel of ones and stride s reads only every s-th position (x[:, ::s, ::s] in 2-D, with "same"
or "valid" padding alike: such a kernel needs no padding), so each such layer computes its subsample convolved at
stride 1: the same function of the same weights, the layer, its name, its weights and its saved config unchanged (a
saved model reloads as the plain layer). A transposed convolution with such a kernel puts input position i at
output position i*s and zeros between: it is computed at stride 1 and spread out. Each such layer gets, as an
instance method, a call that is its Keras call done that way (kernel, bias, activation); tests/test_narrow_models.py
compares every kind of repaired layer with an unrepaired one, outputs and gradients, and fails if Keras' __call__
stops calling it.
"""

import types

import keras
from keras import ops

CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
DEPTHWISE_CONVOLUTIONS = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
SEPARABLE_CONVOLUTIONS = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
TRANSPOSED_CONVOLUTIONS = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)


def _spatial_axes(layer):
    return range(2, 2 + layer.rank) if layer.data_format == "channels_first" else range(1, 1 + layer.rank)


def _subsample(layer, inputs):
    """Every layer.strides-th position of `inputs` along the spatial axes: x[:, ::sh, ::sw] in 2-D."""
    index = [slice(None)] * len(inputs.shape)
    for axis, stride in zip(_spatial_axes(layer), layer.strides):
        index[axis] = slice(None, None, stride)
    return inputs[tuple(index)]


def _interleave_zeros(layer, outputs):
    """A transposed convolution's placement for a kernel of ones: input position i at output position i*s, zeros
    between, cut to Keras' output length ((n-1)*s + 1 + output_padding, or n*s without output_padding)."""
    output_padding = layer.output_padding or (None,) * layer.rank
    for axis, stride, padding in zip(_spatial_axes(layer), layer.strides, output_padding):
        length = ops.shape(outputs)[axis]
        widths = [[0, 0]] * (len(outputs.shape) + 1)
        widths[axis + 1] = [0, stride - 1]
        interleaved = ops.pad(ops.expand_dims(outputs, axis + 1), widths)
        shape = list(ops.shape(outputs))
        shape[axis] = length * stride
        outputs = ops.reshape(interleaved, shape)
        if padding is not None:
            index = [slice(None)] * len(outputs.shape)
            index[axis] = slice(None, (length - 1) * stride + 1 + padding)
            outputs = outputs[tuple(index)]
    return outputs


def _subsampled_call(layer, inputs):
    """The layer's Keras call for a kernel of ones and a stride: its subsample through the layer's kernel (depthwise
    and pointwise kernels for a separable layer) at stride 1 (for a transposed convolution: its input through the
    kernel at stride 1, then spread out with zeros), plus its bias, through its activation."""
    convolution = dict(strides=1, padding="valid", dilation_rate=layer.dilation_rate, data_format=layer.data_format)
    if isinstance(layer, TRANSPOSED_CONVOLUTIONS):
        outputs = _interleave_zeros(layer, ops.conv_transpose(inputs, layer.kernel, **convolution))
    elif isinstance(layer, SEPARABLE_CONVOLUTIONS):
        outputs = ops.separable_conv(_subsample(layer, inputs), layer.depthwise_kernel, layer.pointwise_kernel,
                                     **convolution)
    elif isinstance(layer, DEPTHWISE_CONVOLUTIONS):
        outputs = ops.depthwise_conv(_subsample(layer, inputs), layer.kernel, **convolution)
    else:
        outputs = ops.conv(_subsample(layer, inputs), layer.kernel, **convolution)
    if layer.use_bias:
        bias_shape = [1] * len(outputs.shape)
        bias_shape[1 if layer.data_format == "channels_first" else -1] = -1
        outputs = ops.add(outputs, ops.reshape(layer.bias, bias_shape))
    return layer.activation(outputs) if layer.activation is not None else outputs


def is_strided_pointwise(layer):
    """A convolution (Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D, Conv1D/2D/3DTranspose) with a kernel of
    ones (1, 1x1, 1x1x1) and a stride above 1."""
    return (isinstance(layer, CONVOLUTIONS + DEPTHWISE_CONVOLUTIONS + SEPARABLE_CONVOLUTIONS + TRANSPOSED_CONVOLUTIONS)
            and set(layer.kernel_size) == {1} and max(layer.strides) > 1 and set(layer.dilation_rate) == {1})


def subsample_strided_pointwise_convs(model):
    """Makes every strided convolution with a kernel of ones in `model` (functional, Sequential or subclassed,
    nested models included) subsample and then convolve at stride 1, in place. Returns the names of the layers
    changed (a layer already changed is left as it is).

    Example:

    >>> model = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Conv2D(4, 1, strides=2)])
    >>> subsample_strided_pointwise_convs(model)
    ['conv2d']
    """
    changed = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if is_strided_pointwise(layer) and "call" not in vars(layer):
            layer.call = types.MethodType(_subsampled_call, layer)
            changed.append(layer.name)
    return changed
