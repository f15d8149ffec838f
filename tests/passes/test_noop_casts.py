"""``noop_casts``: casts to the dtype a value already has go, so the conv-BN and linear-BN folds behind them happen
and the folded model converts with ``.double()`` as the original does; real casts stay."""

import torch
from fxreparam.passes.noop_casts import cast_source
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms, run_pass


class _LoraLayer(nn.Module):
    """peft's forward: the base layer plus a low-rank pair, cast back with ``result.to(previous_dtype)``."""

    def __init__(self, base: nn.Module, down: nn.Module, up: nn.Module) -> None:
        super().__init__()
        self.base, self.down, self.up = base, down, up

    def forward(self, x):
        previous_dtype = x.dtype
        result = self.base(x) + self.up(self.down(x.to(self.down.weight.dtype))) * 0.5
        return result.to(previous_dtype)


class _LoraNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _LoraLayer(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1, bias=False),
                               nn.Conv2d(2, 8, 1, bias=False))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.bn1 = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.bn(self.conv(x)).float().mean((2, 3))
        return self.bn1(self.fc(y.to(x.dtype)).type_as(x))


def test_lora_casts_go_and_every_batch_norm_folds():
    model = randomize_batch_norms(_LoraNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    folded = fxreparam.optimize(model, x, capture="export")
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 0, rep
    assert rep.rewrites["noop_casts"] >= 4
    assert not any(cast_source(n) for n in folded.graph.nodes)


def test_without_recorded_devices_only_casts_that_cannot_move_a_value_go():
    """symbolic_trace records no devices: ``.to(x.dtype)`` and ``.float()`` go, ``type_as(x)`` (which moves to x's
    device) stays, and the BN behind it with it."""
    model = randomize_batch_norms(_LoraNet()).eval()
    folded = fxreparam.optimize(model, torch.randn(2, 3, 8, 8), capture="symbolic_trace")
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 1 and rep.rewrites["noop_casts"] >= 3
    assert [n.target for n in folded.graph.nodes if cast_source(n)] == ["type_as"]


def test_folded_model_converts_to_double_as_the_original_does():
    model = randomize_batch_norms(_LoraNet()).eval()
    folded = fxreparam.optimize(model, torch.randn(2, 3, 8, 8))  # export bakes the dtype into each cast
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(folded.double()(x), model.double()(x))


class _RealCasts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).half().float() + self.conv(x).to(torch.float32)


def test_casts_that_change_the_dtype_stay():
    run = run_pass("noop_casts", _RealCasts(), torch.randn(1, 3, 6, 6), capture="symbolic_trace")  # the methods
    assert run.rewrites == 1 and run.error == 0.0  # only .to(float32) of a float32 value goes
    assert sum(n.op == "call_method" and n.target in ("half", "float") for n in run.gm.graph.nodes) == 2
