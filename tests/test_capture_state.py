"""State on every capture path: buffer writes in forward are kept in the folded graph or refused naming the buffer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxreparam
from fxreparam.capture import capture


class Counter(nn.Module):
    """A conv whose output is scaled by a call counter the forward advances (``write`` says how)."""

    def __init__(self, write: str) -> None:
        super().__init__()
        self.conv, self.write = nn.Conv2d(3, 4, 1), write
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write == "add_":
            self.count.add_(1)
        elif self.write == "copy_":
            self.count.copy_(self.count + 1)
        else:
            self.count = self.count + 1
        return self.conv(x) * self.count


def twin(model: Counter) -> Counter:
    """A fresh model with ``model``'s weights and state."""
    other = Counter(model.write).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("write", ["add_", "copy_"])
@pytest.mark.parametrize("inputs", [False, True], ids=["symbolic_trace", "export"])
def test_an_in_place_buffer_write_is_kept_in_the_folded_graph(write, inputs):
    model, x = Counter(write).eval(), torch.randn(2, 3, 4, 4)
    reference = twin(model)
    folded = fxreparam.optimize(model, x if inputs else None, verify=False)
    with torch.no_grad():
        for _ in range(3):
            assert torch.allclose(folded(x), reference(x), atol=1e-6)
    assert float(model.count) == 0.0  # the user's model is untouched


def test_symbolic_trace_refuses_a_buffer_assigned_in_forward_naming_it_and_leaves_the_model_alone():
    model = Counter("assign").eval()
    with pytest.raises(fxreparam.CaptureError, match=r"buffer 'count'"):
        capture(model, None)
    assert isinstance(model.count, torch.Tensor) and float(model.count) == 0.0


def test_symbolic_trace_does_not_advance_the_model_it_traces():
    model = Counter("add_").eval()
    capture(model, None)
    assert float(model.count) == 0.0
