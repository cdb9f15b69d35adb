"""BatchNormalization on TensorFlow's fused kernel, for the training model.

Keras 3 composes BatchNormalization from separate ops (a cast to float32, `tf.nn.moments`'
two reductions, `tf.nn.batch_normalization`, a cast back), and the backward pass differentiates
each; Keras 2 called the fused kernel (`FusedBatchNormV3`: oneDNN on a CPU, cuDNN on a GPU),
which does the same arithmetic in one pass forward and one back. InceptionV3 has 94 of them, and
on 2 CPU cores the composed ops cost a fifth of the training step (bench/bench_training_step.py:
bf16 at 160², batch 32, 0.78x the step with the fused kernel, float32 0.85x).

Where the kernel takes no such tensor (bf16 on a GPU, float64) the layer is Keras' own.
Same weights, same statistics, same outputs to float rounding: only the training model uses it
(`fuse_batch_norm`); the artifact is built from plain Keras layers (`ich.model.build_model`) and
takes the weights in the same order, so serving and the artifact contract do not change.
"""
from __future__ import annotations

import functools


def kernel_takes(dtype: str, gpus: list | None = None) -> bool:
    """Whether TensorFlow's fused kernel takes `dtype` here: float32 and float16 everywhere,
    bfloat16 on the CPU only (oneDNN has the kernel; TensorFlow registers none for a GPU, where
    the op would fall back to the host). `gpus`: the visible GPUs (None: asked of TensorFlow)."""
    if dtype in ("float32", "float16"):
        return True
    if gpus is None:
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
    return dtype == "bfloat16" and not gpus


@functools.cache
def fused_layer():
    """The FusedBatchNormalization class, defined on first use (importing this module stays
    TensorFlow-free, like `ich.model`)."""
    import keras
    import tensorflow as tf

    class FusedBatchNormalization(keras.layers.BatchNormalization):
        """`keras.layers.BatchNormalization` whose NHWC, channels-last case calls the fused
        kernel; any other case (a mask, renorm, synchronised statistics, another rank or axis,
        another backend, a dtype the kernel does not take here) is Keras' own code."""

        def call(self, inputs, training=None, mask=None):
            if (mask is not None or self.renorm or self.synchronized or keras.backend.backend() != "tensorflow"
                    or len(inputs.shape) != 4 or self.axis not in (-1, 3)
                    or not kernel_takes(keras.backend.standardize_dtype(inputs.dtype))):
                return super().call(inputs, training=training, mask=mask)
            channels = inputs.shape[-1]
            gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels])
            beta = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels])
            if training and self.trainable:
                y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                    inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
                # The kernel returns the unbiased variance; Keras' moving statistics (and
                # PreciseBN, which reads them at momentum 0) hold the biased one.
                n = tf.cast(tf.size(inputs) // channels, "float32")
                variance *= (n - 1.0) / tf.maximum(n, 1.0)
                self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
                self.moving_variance.assign(
                    self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            else:
                y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                    inputs, gamma, beta, mean=tf.cast(self.moving_mean, "float32"),
                    variance=tf.cast(self.moving_variance, "float32"), epsilon=self.epsilon,
                    is_training=False)
            return tf.cast(y, self.compute_dtype)

    return FusedBatchNormalization


def fuse_batch_norm(model):
    """A copy of `model` (a Functional model, nested ones included) whose BatchNormalization
    layers are FusedBatchNormalization, with the same weights in the same order."""
    import keras

    fused = fused_layer()

    def clone(layer):
        cls = fused if type(layer) is keras.layers.BatchNormalization else layer.__class__
        return cls.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy
