"""The seeds' own systems from torchvision, float32: ResNet, RegNet and WRN keep no BatchNorm;
DenseNet folds every BN that follows a conv and reports the pre-activation BNs it cannot fold."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import fold, rel_err
from torch import fx

import fxreparam
from fxreparam import ops


def _bn_inputs(folded: fx.GraphModule) -> list[str]:
    """The op feeding each batch norm still in the graph."""
    out = []
    for node in folded.graph.nodes:
        bn = ops.batch_norm(folded, node)
        if bn is not None:
            out.append(ops.conv(folded, bn.input) is not None)
    return out


@pytest.mark.parametrize("name", ["resnet18", "regnet_y_400mf", "wide_resnet50_2"])
def test_no_batch_norm_left(name):
    model = getattr(torchvision.models, name)()
    x = torch.randn(2, 3, 64, 64)
    folded = fold(model, x)
    rep = fxreparam.report(folded)
    assert rep.before.batch_norm > 0 and rep.after.batch_norm == 0
    assert rep.after.conv == rep.before.conv
    assert rep.verification.ok  # per channel, within the model's own float32 rounding
    y = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(y), folded(y)) < 1e-5


def test_densenet121_folds_conv_bn_and_lists_pre_activation_bns():
    model = torchvision.models.densenet121()
    folded = fold(model, torch.randn(1, 3, 64, 64))
    rep = fxreparam.report(folded)
    # Every dense layer's norm2 follows conv1, and norm0 follows conv0: 58 + 1 folds.
    assert rep.rewrites["conv_bn"] == 59
    remaining = _bn_inputs(folded)
    assert len(remaining) == rep.before.batch_norm - 59 and not any(remaining)
    reasons = [r.reason for r in rep.refusals]
    for path in ("features.denseblock1.denselayer1.norm1", "features.transition1.norm", "features.norm5"):
        assert any(f"'{path}'" in reason and "not a conv" in reason for reason in reasons), path
    assert len({r.node for r in rep.refusals}) == len(remaining)
