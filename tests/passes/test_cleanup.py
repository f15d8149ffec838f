"""``cleanup`` alone: dead nodes and the tensors nothing reads go; in-place writes that matter stay."""

import torch
from torch import nn

from fxreparam.testing import run_pass


class _Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        self.unused(x)
        return self.used(x)


def test_unread_layers_and_their_weights_go():
    run = run_pass("cleanup", _Dead(), torch.randn(1, 2, 3, 3))
    assert run.count("conv") == 1 and not hasattr(run.gm, "unused")


class _WritesInput(nn.Module):
    def forward(self, x):
        y = x * 2
        x.add_(1)  # a write into the caller's tensor: an effect, never dead code
        return y


def test_write_into_an_input_is_kept():
    run = run_pass("cleanup", _WritesInput(), torch.zeros(1, 2), capture="symbolic_trace")  # export: aten.copy_
    assert any(n.target == "add_" for n in run.gm.graph.nodes)
