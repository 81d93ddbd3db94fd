"""The shared Keras layers with TensorFlow kernels where they are faster or exact (``TF_LAYERS``).

    * BatchNorm: a keras.layers.BatchNormalization (same variables, names and counts) whose
      call runs TF's fused kernel with the IR's running-variance rule.
    * Conv2D, DepthwiseConv2D: the bias added by tf.nn.bias_add in the layer's data format.
    * Pool: tf.nn pooling in NCHW (Keras' pooling layers transpose NCHW on TF).
    * LRN: TF's kernel where it is the same formula.

Imported by backends/tf/impl.py, which sets KERAS_BACKEND=tensorflow first.
"""

from __future__ import annotations

from dataclasses import replace

import keras
import tensorflow as tf

from samenet.backends.keras import layers


class BatchNorm(layers.BatchNorm):
    """Keras BN (same variables and counts) running TF's fused kernel with the IR's rule."""

    def call(self, inputs, training=None, mask=None):
        x = inputs
        flat = len(x.shape) == 2
        c = x.shape[-1] if (flat or self.axis in (-1, 3)) else x.shape[1]
        if flat:
            x = tf.reshape(x, (-1, 1, 1, c))
        fmt = "NHWC" if flat or self.axis in (-1, 3) else "NCHW"
        if x.dtype == tf.float64:  # no fused kernel for doubles (verification runs only)
            y = self._call_unfused(x, training)
            return tf.reshape(y, (-1, c)) if flat else y
        scale = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones((c,), tf.float32)
        offset = tf.convert_to_tensor(self.beta) if self.center else tf.zeros((c,), tf.float32)
        mean = tf.convert_to_tensor(self.moving_mean)
        var = tf.convert_to_tensor(self.moving_variance)
        if training and self.trainable:
            y, new_mean, new_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=scale, offset=offset, mean=mean, variance=var, epsilon=self.epsilon,
                exponential_avg_factor=self.torch_momentum, data_format=fmt, is_training=True)
            self.moving_mean.assign(new_mean)
            self.moving_variance.assign(new_var)
        else:
            y = tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=mean, variance=var,
                                            epsilon=self.epsilon, data_format=fmt, is_training=False)[0]
        if flat:
            y = tf.reshape(y, (-1, c))
        return tf.cast(y, self.compute_dtype)

    def _call_unfused(self, x, training):
        axes = [0, 1, 2] if (len(x.shape) == 2 or self.axis in (-1, 3)) else [0, 2, 3]
        shape = [1, 1, 1, -1] if axes == [0, 1, 2] else [1, -1, 1, 1]
        if training and self.trainable:
            mean, var = tf.nn.moments(x, axes)
            n = tf.cast(tf.size(x) // tf.size(mean), x.dtype)
            m = self.torch_momentum
            self.moving_mean.assign((1 - m) * self.moving_mean + m * mean)
            self.moving_variance.assign((1 - m) * self.moving_variance + m * var * n / tf.maximum(n - 1, 1))
        else:
            mean, var = tf.convert_to_tensor(self.moving_mean), tf.convert_to_tensor(self.moving_variance)
        y = (x - tf.reshape(mean, shape)) / tf.sqrt(tf.reshape(var, shape) + self.epsilon)
        if self.scale:
            y = y * tf.reshape(self.gamma, shape)
        if self.center:
            y = y + tf.reshape(self.beta, shape)
        return y


class Conv2D(keras.layers.Conv2D):
    """Keras Conv2D with the bias added by tf.nn.bias_add in the layer's own data format.

    keras.ops.add (Keras 3.15) turns "x + bias" into BiasAdd and guesses the channel axis
    from the shapes: channels_first with W == filters gets the bias added along W.
    """

    def call(self, inputs):
        y = self.convolution_op(inputs, self.kernel)
        if self.use_bias:
            y = tf.nn.bias_add(y, self.bias, data_format="NHWC" if self.data_format == "channels_last" else "NCHW")
        return y


class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """Keras DepthwiseConv2D, bias added as in Conv2D above."""

    def call(self, inputs):
        y = keras.ops.depthwise_conv(inputs, self.kernel, strides=self.strides, padding=self.padding,
                                     dilation_rate=self.dilation_rate, data_format=self.data_format)
        if self.use_bias:
            y = tf.nn.bias_add(y, self.bias, data_format="NHWC" if self.data_format == "channels_last" else "NCHW")
        return y


class Pool(layers.Pool):
    """tf.nn max/avg pooling, valid or same, in either layout (Keras' own pooling layers
    transpose NCHW on TF; used only for channels_first), then an optional constant
    factor map (average pooling divisor correction)."""

    def call(self, x):
        f = tf.nn.max_pool2d if self.kind == "max" else tf.nn.avg_pool2d
        y = f(x, self.kernel, self.stride, self.padding, data_format="NHWC" if self.channels_last else "NCHW")
        if self.factor is not None:
            y = y * tf.constant(self.factor, y.dtype)
        return y


class LRN(layers.LRN):
    """TF's LRN kernel where it is the same formula (odd n, NHWC, float32)."""

    def call(self, x):
        n = self.size
        if self.channels_last and n % 2 == 1 and x.dtype == tf.float32:
            return tf.nn.local_response_normalization(x, depth_radius=(n - 1) // 2, bias=self.k,
                                                      alpha=self.alpha, beta=self.beta)
        return self.window_lrn(x)


TF_LAYERS = replace(layers.GENERIC, BatchNorm=BatchNorm, Conv2D=Conv2D, DepthwiseConv2D=DepthwiseConv2D, Pool=Pool,
                    LRN=LRN)
"""The builder's layer classes on the tf backend."""
