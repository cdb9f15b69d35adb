"""Progressive resizing: the early epochs train on smaller images (cheaper steps), the last ones,
the validation and the artifact at the input size. (A run killed in its small epochs resumes
at the full size: tests/training/test_distributed.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from tests.modelfactory import LOOP_ENGINE
from training import config
from training.config import ConfigError, early_epochs


def test_early_epochs_are_every_epoch_but_the_last_full_ones_and_off_by_default():
    recipe = config.load(["--synthetic-studies", "2"])
    assert recipe.early_size is None and early_epochs(recipe) == 0   # measured weaker: off
    grown = config.load(["--synthetic-studies", "2", "--early-size", "128"])
    assert (grown.input_size, grown.epochs, grown.full_epochs) == (160, 7, 3)
    assert early_epochs(grown) == 4 and grown.validate_from > 4      # validated at full size
    assert early_epochs(config.load(["--synthetic-studies", "2", "--early-size", "128",
                                     "--full-epochs", "6"])) == 1
    # fewer epochs than the full-size tail, or an early size not below the input: none small
    for flags in (["--epochs", "2"], ["--input-size", "128"], ["--recipe", "reference"]):
        assert early_epochs(config.load(["--synthetic-studies", "2", "--early-size", "128", *flags])) == 0
    with pytest.raises(ConfigError, match="early-size must be at least 75"):
        config.load(["--synthetic-studies", "2", "--early-size", "64"])
    with pytest.raises(ConfigError, match="full_epochs must be at least 1"):
        config.load(["--synthetic-studies", "2", "--full-epochs", "0"])


def test_the_model_trained_at_two_sizes_exports_the_input_size_with_the_same_weights():
    import tensorflow as tf

    from training.data import DevicePreprocess
    from training.train import MyDeepModel, weights_digest

    deep = MyDeepModel(engine=LOOP_ENGINE, input_dims=(96, 96, 3), batch_size=4, num_epochs=3, verbose=0,
                       early_size=80, early_epochs=2)
    assert deep.phases() == [(0, 2, 80), (2, 3, 96)]
    x = np.random.default_rng(0).random((2, 96, 96, 3), np.float32)
    small = deep.model(x[:, :80, :80], training=False)            # any size trains...
    assert small.shape == (2, 6)
    exported = deep.export_model()                                 # ...one size serves
    assert exported.input_shape == (None, 96, 96, 3)
    assert weights_digest(exported) == weights_digest(deep.model)
    assert np.abs(np.asarray(exported(x, training=False)) - np.asarray(deep.model(x, training=False))).max() < 1e-5
    # no early size below the input size, or no early epochs: one phase, a fixed-size model
    for kwargs in ({"early_size": 96, "early_epochs": 2}, {"early_size": 80, "early_epochs": 0}):
        plain = MyDeepModel(engine=LOOP_ENGINE, input_dims=(96, 96, 3), batch_size=4, num_epochs=3, verbose=0,
                            **kwargs)
        assert plain.phases() == [(0, 3, 96)] and plain.model.input_shape == (None, 96, 96, 3)
    # on an accelerator the training step shrinks the augmented windows itself
    hu = tf.random.uniform((3, 96, 96), -100, 100)
    assert DevicePreprocess(1, None, 1.0, 96)(hu, 0, size=80).shape == (3, 80, 80, 3)
    assert DevicePreprocess(1, None, 1.0, 96)(hu, 0).shape == (3, 96, 96, 3)


def test_the_training_pipeline_shrinks_its_images_to_the_phase_size(phantoms, tmp_path):
    from training.prepare import prepare

    cache = prepare(phantoms, tmp_path / "cache", 96, processes=1)
    for size, expected in ((80, 80), (None, 96), (96, 96)):
        images, labels = next(iter(cache.batches(cache.slices, 4, training=True, augment=1.0, size=size)))
        assert images.shape == (4, expected, expected, 3) and labels.shape == (4, 6)
    # the windows are downscaled whole (antialiased), not cropped: same range, same mean
    whole = next(iter(cache.batches(cache.slices, 4, training=True, seed=3)))[0].numpy()
    small = next(iter(cache.batches(cache.slices, 4, training=True, seed=3, size=48)))[0].numpy()
    assert small.shape == (4, 48, 48, 3)
    assert abs(small.mean() - whole.mean()) < 0.01 and small.max() <= 1.0 + 1e-6
