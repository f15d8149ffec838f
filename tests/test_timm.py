"""timm's re-parameterizable models in their training structure, eval mode: after ``optimize`` a forward
pass executes no more conv, linear, batch-norm and add ops and no more multiply-accumulates than after timm's
hand-written ``reparameterize_model``, stores at most 1.05x its weights, and the outputs agree (relative error
< 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err

import fxreparam
from fxreparam.testing import executed_ops, randomize_batch_norms, stored_elements

timm = pytest.importorskip("timm", reason="timm is a test dependency: pip install -e '.[test]'")
from timm.utils.model import reparameterize_model  # noqa: E402


def _case(name: str, size: int = 64, slow: bool = False, **options) -> object:
    return pytest.param(name, size, options, id=name, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize(("name", "size", "options"), [
    _case("repvgg_a0"), _case("repvgg_b1", slow=True), _case("mobileone_s0"), _case("mobileone_s2", slow=True),
    _case("levit_128s", 112, img_size=112),       # linear-BN through flatten/reshape, BN1d-Linear heads, two heads
    _case("efficientvit_m0", 112, img_size=112),  # conv-BN, a BN1d before its classifier
    _case("repvit_m1_1"),                         # RepVGG-style depthwise blocks, (head + head_dist) / 2
])
def test_folds_at_least_as_far_as_timms_reparameterize(name, size, options):
    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model(name, pretrained=False, **options)).eval()
    x = torch.randn(1, 3, size, size)
    folded = fxreparam.optimize(model, x)
    by_hand = reparameterize_model(copy.deepcopy(model))
    ours, theirs, before = executed_ops(folded, x), executed_ops(by_hand, x), executed_ops(model, x)
    assert before["batch_norm"] > 0 and ours["batch_norm"] == 0
    for kind in ours:
        assert ours[kind] <= theirs[kind], (kind, ours, theirs)
    assert stored_elements(folded) <= 1.05 * stored_elements(by_hand)
    y = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert rel_err(model(y), folded(y)) < 1e-5
    assert fxreparam.report(folded).verification.ok
