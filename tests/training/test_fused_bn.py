"""The training model's BatchNorm on TensorFlow's fused kernel: the same outputs, statistics and
gradients as Keras' own layer, the same weights in the same order, and an artifact built from
Keras' own layers. (Its speed is a benchmark: bench/bench_training_step.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from training import config


def _pair(shape, momentum=0.9):
    import keras

    from training.fused_bn import fused_layer

    plain, fused = keras.layers.BatchNormalization(momentum=momentum), fused_layer()(momentum=momentum)
    plain.build(shape)
    fused.build(shape)
    rng = np.random.default_rng(1)
    for v in plain.weights:   # gamma, beta, moving mean and variance away from 1, 0, 0, 1
        v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
    fused.set_weights(plain.get_weights())
    return plain, fused


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_the_fused_layer_computes_what_keras_batch_normalization_computes(policy):
    """Momentum 0 (what PreciseBN traces) and 2 x 3 x 3 positions per channel: the moving
    variance is the batch's biased variance, where the kernel's own would be 18/17 of it."""
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(policy)
    try:
        plain, fused = _pair((2, 3, 3, 16), momentum=0.0)
        rng = np.random.default_rng(0)
        x = tf.cast(rng.normal(3.0, 2.0, (2, 3, 3, 16)).astype(np.float32), plain.compute_dtype)
        weights = tf.constant(rng.normal(0.0, 1.0, (2, 3, 3, 16)).astype(np.float32))
        grads, outputs = [], []
        for layer in (plain, fused):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.cast(y, "float32") * weights)
            outputs.append(np.asarray(tf.cast(y, "float32")))
            grads.append([np.asarray(tf.cast(g, "float32")) for g in tape.gradient(loss, [x, layer.gamma, layer.beta])])
            assert y.dtype == layer.compute_dtype
        tolerance = 1e-5 if policy == "float32" else 2e-2
        np.testing.assert_allclose(outputs[0], outputs[1], atol=tolerance)
        for a, b in zip(*grads):
            np.testing.assert_allclose(a, b, atol=tolerance * np.abs(a).max())
        for a, b in zip(plain.weights, fused.weights):   # the moving statistics moved alike
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)
        batch = np.asarray(tf.cast(x, "float32"))
        np.testing.assert_allclose(fused.moving_variance.numpy(), batch.var(axis=(0, 1, 2)), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(tf.cast(plain(x, training=False), "float32")),
                                   np.asarray(tf.cast(fused(x, training=False), "float32")), atol=tolerance)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_cases_the_kernel_does_not_take_are_keras_own():
    """A mask, or a tensor that is not NHWC: Keras' composed ops, the same result."""
    plain, fused = _pair((4, 5))
    x = np.random.default_rng(2).normal(1.0, 2.0, (4, 5)).astype(np.float32)
    np.testing.assert_allclose(plain(x, training=True), fused(x, training=True), atol=1e-5)
    plain, fused = _pair((2, 3, 5))
    x = np.random.default_rng(3).normal(1.0, 2.0, (2, 3, 5)).astype(np.float32)
    mask = np.array([[True, True, False], [True, False, False]])
    np.testing.assert_allclose(plain(x, training=True, mask=mask), fused(x, training=True, mask=mask), atol=1e-5)


def test_bf16_takes_the_fused_kernel_only_without_a_gpu():
    """TensorFlow registers the GPU kernel for float32 and float16 only: bf16 there (what
    `--mixed-precision auto` picks on Ampere) stays on Keras' ops instead of falling back to
    the host."""
    from training.fused_bn import kernel_takes

    assert kernel_takes("float32", gpus=["GPU:0"]) and kernel_takes("float16", gpus=["GPU:0"])
    assert kernel_takes("bfloat16", gpus=[]) and not kernel_takes("bfloat16", gpus=["GPU:0"])
    assert not kernel_takes("float64", gpus=[])


def test_the_training_model_is_fused_and_the_artifact_is_plain_keras_with_the_same_weights():
    import keras

    from training.fused_bn import fused_layer
    from training.train import MyDeepModel, _all_layers, weights_digest

    deep = MyDeepModel(input_dims=(75, 75, 3), batch_size=2, bn_momentum=0.9, verbose=0)
    norms = [l for l in _all_layers(deep.model) if isinstance(l, keras.layers.BatchNormalization)]
    assert len(norms) == 94 and all(type(l) is fused_layer() for l in norms)
    assert {l.momentum for l in norms} == {0.9}
    x = np.random.default_rng(0).random((2, 75, 75, 3), np.float32)
    deep.model.train_on_batch(x, np.ones((2, 6), np.float32))     # statistics and weights move
    exported = deep.export_model()
    assert not any(type(l) is fused_layer() for l in _all_layers(exported))   # nothing custom to load
    assert weights_digest(exported) == weights_digest(deep.model)
    np.testing.assert_allclose(exported(x, training=False), deep.model(x, training=False), atol=1e-5)
    off = MyDeepModel(input_dims=(75, 75, 3), batch_size=2, verbose=0, fused_batch_norm=False)
    assert not any(type(l) is fused_layer() for l in _all_layers(off.model))


def test_fused_batch_norm_is_on_by_default_and_can_be_turned_off():
    assert config.load(["--synthetic-studies", "2"]).fused_batch_norm is True
    assert config.load(["--synthetic-studies", "2", "--recipe", "reference"]).fused_batch_norm is True
    assert config.load(["--synthetic-studies", "2", "--no-fused-batch-norm"]).fused_batch_norm is False
