"""Never costlier than the input: zero tensors not stored, speculative compositions undone when the fold that
was to pay for them does not land, weights read at several places stored once, and the whole-result check."""

import torch
from torch import nn

import fxreparam


def _stored(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


def _folded_and_report(model: nn.Module, *inputs: torch.Tensor):
    folded = fxreparam.optimize(model, inputs if len(inputs) > 1 else inputs[0])
    return folded, fxreparam.report(folded)


class _ScaledBiasFree(nn.Module):
    """A scale folded into bias-free layers (every LoRA B): the folded layers must stay bias-free."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6, bias=False)
        self.conv = nn.Conv2d(3, 4, 3, bias=False)

    def forward(self, x, y):
        return self.fc(x) * 0.5, self.conv(y) * 2.0


def test_zero_bias_is_not_stored():
    folded, rep = _folded_and_report(_ScaledBiasFree().eval(), torch.randn(2, 8), torch.randn(1, 3, 6, 6))
    assert rep.after.mul_div == 0
    assert all(getattr(m, "bias", None) is None for m in folded.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert rep.after.parameters == 6 * 8 + 4 * 3 * 3 * 3
