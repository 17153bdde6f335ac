"""Minimal reproduction, for an upstream report: TensorFlow 2.21's oneDNN filter gradient of a 1x1 convolution of
stride 2 corrupts memory on inputs of 56x56 and more with few channels (here 4 in, 8 out).

    python docs/onednn_strided_1x1_crash.py            # Segmentation fault (exit 139) or "malloc(): corrupted ..."
    TF_ENABLE_ONEDNN_OPTS=0 python docs/onednn_strided_1x1_crash.py     # prints "ok"

Measured on TF 2.21 CPU wheels (2-core AMD EPYC with AVX512): crashes for even sizes 56-128 with 1-8 input
channels and 2-16 output channels; runs for 48x48, odd sizes (63), 12 -> 24 or 16 -> 32 channels, 4 -> 64 channels,
3x3 kernels, 1x1 of stride 1; Conv2DBackpropInput of the same shapes runs. mtard_tf's models avoid the op (a strided
1x1 convolution is built as a subsample followed by a 1x1 convolution of stride 1: mtard_tf/models/architectures.py;
a model a user brings is repaired by mtard_tf/models/pointwise_strides.py).
"""

import tensorflow as tf

images = tf.random.normal([32, 64, 64, 4])
kernel_shape = tf.constant([1, 1, 4, 8])
output_gradient = tf.random.normal([32, 32, 32, 8])


@tf.function
def filter_gradient():
    return tf.raw_ops.Conv2DBackpropFilter(input=images, filter_sizes=kernel_shape, out_backprop=output_gradient,
                                           strides=[1, 2, 2, 1], padding="VALID")


for _ in range(3):
    result = filter_gradient()
print("ok", float(tf.reduce_sum(result)))
