"""The fold-and-verify core: one function serves optimize and the torch.compile backend."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

import fxreparam
import fxreparam.core
from fxreparam.report import count_ops
from fxreparam.testing import randomize_batch_norms


def _conv_bn() -> nn.Module:
    return randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))).eval()


def test_optimize_and_the_backend_fold_through_the_same_core(monkeypatch):
    calls = []
    real = fxreparam.core.fold

    def spy(source, passes, **kwargs):
        calls.append(source.model)
        return real(source, passes, **kwargs)

    monkeypatch.setattr(fxreparam.core, "fold", spy)
    monkeypatch.setattr(fxreparam.api, "fold", spy)
    monkeypatch.setattr(fxreparam.backends, "fold", spy)
    x = torch.randn(2, 3, 8, 8)
    fxreparam.optimize(_conv_bn(), x)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(_conv_bn(), backend="fxreparam", options={"inner": "eager"})(x)
    assert calls == ["Sequential", "torch.compile region"]


def _has_batch_norm(gm: torch.fx.GraphModule) -> bool:
    return count_ops(gm).batch_norm > 0


def test_blame_names_the_first_pass_after_which_the_check_fails():
    from fxreparam.capture import capture
    from fxreparam.verify import Reference

    model, x = _conv_bn(), torch.randn(2, 3, 8, 8)
    reference = Reference(model, (x,))
    passes = fxreparam.list_passes()

    def fresh():
        return capture(model, (x,), {}, "symbolic_trace").gm

    ok = reference.check(model)
    assert fxreparam.core.blame(fresh, reference.check, passes, ok) == ("finalize", ok)
    failing = dataclasses.replace(ok, error=math.inf)

    def rejects_folded_batch_norms(candidate):
        return ok if _has_batch_norm(candidate) else failing

    assert fxreparam.core.blame(fresh, rejects_folded_batch_norms, passes, ok) == ("conv_bn", failing)
