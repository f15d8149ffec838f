"""Shared test helpers: run a model and its folded form, and measure how far apart they are."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import settings
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms
from fxreparam.verify import relative_error

# CI replays the same examples every run (a red CI is then a real, reproducible bug); locally each run
# explores new ones. ``HYPOTHESIS_PROFILE=fuzz`` runs many more (see README).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("fuzz", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))


def rel_err(a, b) -> float:
    return relative_error(a, b)


def fold(model: nn.Module, *inputs: torch.Tensor, **kwargs) -> nn.Module:
    """Optimize a model with random BN statistics (in place on the model), checking the result in float32."""
    randomize_batch_norms(model)
    model.eval()
    folded = fxreparam.optimize(model, inputs, **kwargs)
    with torch.no_grad():
        assert rel_err(model(*inputs), folded(*inputs)) < 1e-5
    return folded


def count_kind(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


__all__ = ["copy", "count_kind", "fold", "rel_err"]
