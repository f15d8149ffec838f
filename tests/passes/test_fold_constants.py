"""``fold_constants`` alone: subgraphs of stored tensors become stored weights; random or written ones do not."""

import torch
import torch.nn.functional as F
from torch import nn

from fxreparam import cost
from fxreparam.testing import run_pass


class _Normalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, F.normalize(self.weight.flatten(1)).view_as(self.weight))


def test_weight_computed_from_parameters_becomes_a_constant():
    run = run_pass("fold_constants", _Normalized(), torch.randn(1, 3, 4, 4))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


class _InPlace(nn.Module):
    """A Dirac kernel written into a zeros tensor: with symbolic_trace the write is in place."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 3, 3))

    def forward(self, x):
        d = torch.zeros_like(self.weight)
        for k in range(3):
            d[k, k, 1, 1].fill_(1.0)  # a write through a view
        return F.conv2d(x, d + self.weight, padding=1)


def test_tensor_written_in_place_is_not_frozen_before_its_writes():
    run = run_pass("fold_constants", _InPlace(), torch.randn(1, 3, 4, 4))
    assert run.error < 1e-6  # folded after the writes, or left to run in forward


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.rate = nn.Parameter(torch.full((3,), 4.0))

    def forward(self, x):
        return x + torch.poisson(self.rate).view(1, 3, 1, 1)


def test_random_op_is_not_frozen():
    gm = run_pass("fold_constants", _Noisy(), torch.zeros(1, 3, 2, 2)).gm
    assert any(n.target in (torch.poisson, torch.ops.aten.poisson.default) for n in gm.graph.nodes)


class _GatheredBias(nn.Module):
    """An attention bias gathered from a small table by stored indices (LeViT-style), and a kernel padded to 5x5."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2, 9))
        self.register_buffer("idxs", torch.randint(0, 9, (16, 16)))
        self.small = nn.Parameter(torch.randn(4, 2, 3, 3))

    def forward(self, x):  # x: [B, 2, 4, 4]
        attn = x.flatten(2).transpose(1, 2) @ x.flatten(2) + self.table[:, self.idxs].sum(0)  # [B, 16, 16]
        return F.conv2d(x, F.pad(self.small, (1, 1, 1, 1)), padding=2), attn


def test_a_constant_that_grows_is_precomputed_only_within_the_budget():
    """A kernel padded in forward adds what it grew by, a gathered bias all of itself; on a model this small the
    precompute budget (1% of its stored elements) holds neither, so both stay in forward (the result would store
    more than the model it was given)."""
    run = run_pass("fold_constants", _GatheredBias(), torch.randn(1, 2, 4, 4))
    assert run.error < 1e-6
    assert run.rewrites == 0
    assert "would grow to 200 stored elements from 72, adding 128" in run.reasons  # the padded kernel
    assert "would grow to 256 stored elements from 18, adding 256" in run.reasons  # the gathered bias


class _GatheredBiasBeside(_GatheredBias):
    """:class:`_GatheredBias` beside a 20,000-element layer: a budget of 200, which the padded kernel's growth of
    128 fits and the gathered bias (256) then does not."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(100, 200, bias=False)

    def forward(self, x):
        y, attn = super().forward(x)
        return y, attn, self.fc(x.flatten(1).repeat(1, 4)[:, :100])


def test_a_kernel_that_grows_is_precomputed_where_the_budget_holds_it():
    run = run_pass("fold_constants", _GatheredBiasBeside(), torch.randn(1, 2, 4, 4))
    assert run.error < 1e-6
    assert run.rewrites == 1  # the padded kernel: 128 of the 200
    assert "would grow to 256 stored elements from 18, adding 256: more than the 72 left" in run.reasons


def test_a_kernel_built_from_a_few_scalars_is_charged_for_its_growth():
    """A mask written into a zero tensor through views (select / select_scatter chains read the zeros along many
    paths) times a learned scale: its sources are the scale and two scalars, not one per path, so the
    kernel's 144 elements grow the model by 126 and the small model's budget does not hold them."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(16, 1, 1, 1))

        def forward(self, x):
            mask = torch.zeros(16, 1, 3, 3, dtype=x.dtype)
            mask[:, 0, 0, 1] = 1.0
            mask[:, 0, 1, 0] = 2.0
            mask[:, 0, 2, 1].fill_(-1.0)
            return F.conv2d(x, self.scale * mask, padding=1, groups=16)

    run = run_pass("fold_constants", Masked(), torch.randn(1, 16, 6, 6))
    assert run.error < 1e-6
    assert run.rewrites == 0
    assert "would grow to 144 stored elements from 18, adding 126" in run.reasons


class _AnchorHead(nn.Module):
    """A detection head building its anchor grid and stride column in forward from ``arange``, ``meshgrid`` and
    ``full`` (every ultralytics YOLO head): constants of the captured shape, computed on every call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 128, 3, padding=1)
        self.conv2 = nn.Conv2d(128, 2, 1)
        self.register_buffer("stride", torch.tensor([8.0]))

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv(x)))
        h, w = y.shape[2:]
        sx = torch.arange(w, device=y.device, dtype=y.dtype) + 0.5
        sy = torch.arange(h, device=y.device, dtype=y.dtype) + 0.5
        gy, gx = torch.meshgrid(sy, sx, indexing="ij")
        anchors = torch.stack((gx, gy), -1).view(-1, 2)
        strides = torch.full((h * w, 1), self.stride[0], dtype=y.dtype, device=y.device)
        return (y.flatten(2).transpose(1, 2) + anchors) * strides


def _optimized(model: nn.Module, x: torch.Tensor):
    import fxreparam

    folded = fxreparam.optimize(model, x)
    return folded, fxreparam.report(folded)


def test_anchor_grid_built_in_forward_is_precomputed_within_the_budget():
    model, x = _AnchorHead().eval(), torch.randn(1, 16, 6, 6)
    folded, rep = _optimized(model, x)
    assert rep.after.add_sub == 1 and rep.before.add_sub == 3  # the grid's two offsets are gone
    assert not any("arange" in str(n.target) or "meshgrid" in str(n.target) for n in folded.graph.nodes)
    grown = rep.after.parameters - rep.before.parameters
    assert 0 < grown <= cost.precompute_budget(rep.before.parameters)  # 36 * 3 elements of grid and strides
    torch.testing.assert_close(folded(x), model(x))


def test_constant_over_the_budget_stays_in_forward_declined_for_its_cost():
    model, x = _AnchorHead().eval(), torch.randn(1, 16, 32, 32)  # a 32x32 grid: 3,072 elements, over 1%
    folded, rep = _optimized(model, x)
    assert any("arange" in str(n.target) for n in folded.graph.nodes)
    declined = [r for r in rep.refusals if r.declined and "precompute budget" in r.reason]
    assert declined and not [r for r in rep.refusals if not r.declined]


def test_precomputed_elements_are_counted_on_the_graph():
    from fxreparam.passes.fold_constants import precomputed_elements

    run = run_pass("fold_constants", _AnchorHead(), torch.randn(1, 16, 6, 6), capture="symbolic_trace")
    # symbolic_trace reads the grid's sizes from y.shape in forward (not constants): only stride[0] is precomputed
    assert (run.rewrites, precomputed_elements(run.gm), precomputed_elements(torch.fx.symbolic_trace(nn.ReLU()))) \
        == (1, 1, 0)
