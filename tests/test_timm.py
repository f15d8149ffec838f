"""timm's re-parameterizable models in their training structure, eval mode: after ``optimize`` a forward
pass executes no more conv, batch-norm and add ops than after timm's hand-written
``reparameterize_model``, and the outputs agree (relative error < 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err

import fxreparam
from fxreparam.testing import executed_ops, randomize_batch_norms

timm = pytest.importorskip("timm", reason="timm is a test dependency: pip install -e '.[test]'")
from timm.utils.model import reparameterize_model  # noqa: E402


@pytest.mark.parametrize("name", ["repvgg_a0", pytest.param("repvgg_b1", marks=pytest.mark.slow), "mobileone_s0",
                                  pytest.param("mobileone_s2", marks=pytest.mark.slow)])
def test_folds_at_least_as_far_as_timms_reparameterize(name):
    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    folded = fxreparam.optimize(model, x)
    by_hand = reparameterize_model(copy.deepcopy(model))
    ours, theirs, before = executed_ops(folded, x), executed_ops(by_hand, x), executed_ops(model, x)
    assert before["batch_norm"] > 0 and ours["batch_norm"] == 0
    for kind in ours:
        assert ours[kind] <= theirs[kind], (kind, ours, theirs)
    y = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(y), folded(y)) < 1e-5
    assert fxreparam.report(folded).verification.ok
