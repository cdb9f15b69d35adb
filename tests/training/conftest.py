"""Fixtures shared by the training room."""
from __future__ import annotations

import pytest

from training import synthetic


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Four tiny phantom studies (6-8 slices), generated once per test module."""
    root = tmp_path_factory.mktemp("phantoms")
    synthetic.generate(root, studies=4, seed=9, slices=(6, 8))
    return root
