"""``fxreparam.testing.run_pass``: the capture it gives a pass, and an error measured on the model as it was called."""

import pytest
import torch
from torch import nn

from fxreparam.testing import run_pass


def test_run_pass_captures_with_export_by_default():
    """A pass sees the aten graph ``optimize`` captures, unless the test asks for symbolic_trace's module calls."""
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 5, 5)
    exported, traced = run_pass("cleanup", model, x), run_pass("cleanup", model, x, capture="symbolic_trace")
    assert [n.target for n in exported.gm.graph.nodes if n.op == "call_function"] == [torch.ops.aten.conv2d.default]
    assert [n.op for n in traced.gm.graph.nodes] == ["placeholder", "call_module", "output"]
    assert exported.count("conv") == traced.count("conv") == 1


class _WritesInput(nn.Module):
    def forward(self, x):
        y = x * 2
        x.add_(1)
        return y


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_run_pass_runs_model_and_graph_on_their_own_copies_of_the_inputs(capture):
    """Both read zeros: the model's write into its input reached the graph's run (error 2e30)."""
    x = torch.zeros(1, 2)
    run = run_pass("cleanup", _WritesInput(), x, capture=capture)
    assert (run.error, float(x.abs().max())) == (0.0, 0.0)
