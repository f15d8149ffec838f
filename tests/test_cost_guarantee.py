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


class _UnmergedLowRankSum(nn.Module):
    """A base conv plus a low-rank 1x1 -> 3x3 pair (LoRA on a conv) in a sum that cannot fold: the base's output
    is also read alone. Composing the pair into a dense 3x3 pays only if the sum absorbs it."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Conv2d(32, 32, 3, padding=1)
        self.down = nn.Conv2d(32, 2, 1, bias=False)
        self.up = nn.Conv2d(2, 32, 3, padding=1, bias=False)

    def forward(self, x):
        b = self.base(x)
        return b + self.up(self.down(x)), b.mean()


def test_composition_made_for_a_sum_that_does_not_fold_is_undone():
    model, x = _UnmergedLowRankSum().eval(), torch.randn(1, 32, 8, 8)
    folded, rep = _folded_and_report(model, x)
    assert rep.after.parameters <= rep.before.parameters and rep.after.macs <= rep.before.macs
    assert rep.rewrites["settle_provisional"] == 1
    assert any(r.declined and "not composed" in r.reason for r in rep.refusals)
    out, want = folded(x), model(x)
    torch.testing.assert_close(out, want)


class _MergedLowRankSum(_UnmergedLowRankSum):
    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_composition_a_sum_absorbs_still_folds():
    model, x = _MergedLowRankSum().eval(), torch.randn(1, 32, 8, 8)
    folded, rep = _folded_and_report(model, x)
    assert (rep.after.conv, rep.after.add_sub) == (1, 0)
    assert rep.after.parameters == 32 * 32 * 9 + 32
    torch.testing.assert_close(folded(x), model(x))


class _CalledThrice(nn.Module):
    """One MLP called at three places on different inputs (RT-DETR's query_pos_head is called six times)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 8))

    def forward(self, x):
        out = torch.zeros_like(x[:, :1])
        for i in range(3):
            out = torch.relu(out + self.mlp(torch.sigmoid(x * i)))
        return out


def test_build_module_with_shared_gives_one_layer_per_tensor():
    from fxreparam.graph import build_module
    from fxreparam.spec import LinearSpec

    weight, bias, shared = torch.randn(3, 4), torch.randn(3), {}
    storage = (torch.float32, torch.device("cpu"))
    first = build_module(LinearSpec(), weight, bias, storage, shared=shared)
    assert build_module(LinearSpec(), weight, bias, storage, shared=shared) is first
    assert build_module(LinearSpec(), weight.clone(), bias, storage, shared=shared) is not first
    assert build_module(LinearSpec(), weight, bias, storage) is not first


def test_layer_called_at_several_places_is_stored_once():
    model, x = _CalledThrice().eval(), torch.randn(2, 4)
    folded = fxreparam.optimize(model, x)
    assert _stored(folded) == _stored(model)
    torch.testing.assert_close(folded(x), model(x))
    assert _stored(folded.half()) == _stored(model)  # a conversion must not split the shared weight into copies
