"""capture.functional.functionalize_traced: the backend's functionalization of a graph Dynamo captured."""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

from fxreparam.capture.functional import functionalize_traced
from fxreparam.mutation import mark_written


class _WritesInPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y.relu_()
        return y + 1


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def test_writes_become_data_flow_and_the_values_are_kept():
    gm, x = fx.symbolic_trace(_WritesInPlace()), torch.randn(2, 3)
    out, changed = functionalize_traced(gm, _placeholders(gm), [x], writes=mark_written)
    assert changed and out is not gm and "relu_" in str(gm.code) and "relu_" not in str(out.code)
    torch.testing.assert_close(out(x), _WritesInPlace()(x))


def test_a_graph_without_writes_comes_back_as_it_is():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    assert functionalize_traced(gm, _placeholders(gm), [torch.randn(2, 3)], writes=mark_written) == (gm, False)


def test_a_failed_functionalization_keeps_the_writes_and_says_why(caplog):
    gm = fx.symbolic_trace(_WritesInPlace())
    with caplog.at_level(logging.INFO, logger="fxreparam"):  # no tensor to trace on: make_fx cannot run
        out, changed = functionalize_traced(gm, _placeholders(gm), ["not a tensor"], writes=mark_written)
    assert (out, changed) == (gm, False)
    assert "region not functionalized" in caplog.text
