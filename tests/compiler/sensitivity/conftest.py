"""Shared fixtures of the sensitivity tests."""

from __future__ import annotations

import pytest
import torch

from mpqc.compiler.data import load_data
from mpqc.compiler.train import train_float
from mpqc.compiler.zoo import DigitsCNN


@pytest.fixture(scope="module")
def trained_digits():
    """``(model, data)``: the small digits CNN trained in float for 15 epochs (seed 0), in eval mode."""
    torch.manual_seed(0)
    data = load_data("digits")
    model = DigitsCNN()
    train_float(model, data, epochs=15, seed=0)
    return model.eval(), data
