"""timm's re-parameterizable models in their training structure, eval mode: after ``optimize`` a forward
pass executes no more conv, batch-norm and add ops than after timm's hand-written
``reparameterize_model``, and the outputs agree (relative error < 1e-5)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

import fxreparam
from fxreparam.testing import randomize_batch_norms

timm = pytest.importorskip("timm", reason="timm is a test dependency: pip install -e '.[test]'")
from timm.utils.model import reparameterize_model  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts the aten ops one forward pass executes, by overload packet name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def executed(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Conv, batch-norm and add ops executed by one forward pass."""
    with torch.no_grad(), CountOps() as mode:
        model(x)
    kinds = {"conv": ("convolution", "conv"), "batch_norm": ("batch_norm",), "add": ("add",)}
    return {kind: sum(n for op, n in mode.counts.items() if any(w in op for w in words))
            for kind, words in kinds.items()}


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b1", "mobileone_s0", "mobileone_s2"])
def test_folds_at_least_as_far_as_timms_reparameterize(name):
    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    folded = fxreparam.optimize(model, x)
    by_hand = reparameterize_model(copy.deepcopy(model))
    ours, theirs, before = executed(folded, x), executed(by_hand, x), executed(model, x)
    assert before["batch_norm"] > 0 and ours["batch_norm"] == 0
    for kind in ours:
        assert ours[kind] <= theirs[kind], (kind, ours, theirs)
    y = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(y), folded(y)) < 1e-5
    assert fxreparam.report(folded).verification.error < 1e-5
