"""``zero_branches`` alone: a summed term from an all-zero layer (an untrained LoRA B) goes with the layers feeding it;
a term that is not all zero, or that broadcasts the other operand, stays."""

import torch
from torch import nn

from fxreparam.testing import run_pass


class _Adapter(nn.Module):
    def __init__(self, zero: bool) -> None:
        super().__init__()
        self.base, self.down, self.up = nn.Linear(8, 8), nn.Linear(8, 2, bias=False), nn.Linear(2, 8, bias=False)
        if zero:
            nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x)) * 0.5


def test_zero_term_goes_with_the_layers_that_fed_it():
    run = run_pass("zero_branches", _Adapter(zero=True), torch.randn(2, 8))
    assert (run.rewrites, run.error) == (1, 0.0)
    assert run.count("linear") == 1 and run.count("add_sub") == 0


def test_non_zero_term_stays():
    run = run_pass("zero_branches", _Adapter(zero=False), torch.randn(2, 8))
    assert run.rewrites == 0 and run.count("linear") == 3


class _Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.zero = nn.Linear(4, 8)
        nn.init.zeros_(self.zero.weight), nn.init.zeros_(self.zero.bias)

    def forward(self, x, y):
        return y + self.zero(x)  # y: [8] broadcast to [2, 8] by the zero term


def test_zero_term_that_broadcasts_stays():
    run = run_pass("zero_branches", _Broadcast(), torch.randn(2, 4), torch.randn(8))
    assert run.rewrites == 0 and run.error == 0.0


class _WrittenLater(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base, self.zero = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        nn.init.zeros_(self.zero.weight), nn.init.zeros_(self.zero.bias)

    def forward(self, x):
        a = self.base(x)
        y = a + self.zero(x)  # a fresh tensor: the write into a below must not reach it
        a.relu_()
        return y * 2 + a


def test_a_kept_operand_written_in_place_later_stays_summed():
    """``y = a + 0`` is a fresh tensor; were ``y`` replaced by ``a``, ``a.relu_()`` would write into it too."""
    run = run_pass("zero_branches", _WrittenLater(), torch.randn(2, 3, 4, 4), capture="symbolic_trace")  # relu_
    assert run.rewrites == 0 and run.error == 0.0
