"""``sequential`` alone: two linear layers in a row become one where exact and no costlier."""

import torch
import torch.nn.functional as F
from torch import nn

from fxreparam.testing import run_pass


def test_kxk_then_pointwise_composes():
    run = run_pass("sequential", nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 1)),
                   torch.randn(1, 4, 6, 6))
    assert (run.rewrites, run.count("conv"), run.error < 1e-6) == (1, 1, True)


def test_grouped_pointwise_then_grouped_kxk_stays_grouped():
    run = run_pass("sequential", nn.Sequential(nn.Conv2d(8, 8, 1, groups=4), nn.Conv2d(8, 8, 3, groups=4)),
                   torch.randn(1, 8, 6, 6))
    assert (run.rewrites, run.error < 1e-6) == (1, True)
    (conv,) = run.layers(nn.Conv2d)
    assert conv.groups == 4


def test_depthwise_then_dense_pointwise_that_would_densify_is_refused():
    # 16 -> 24 channels: a depthwise 3x3 (144 weights) then a 1x1 (384) is cheaper than one dense 3x3 (3,456).
    run = run_pass("sequential", nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
                                               nn.Conv2d(16, 24, 1, bias=False)), torch.randn(1, 16, 6, 6))
    assert run.rewrites == 0 and "weights" in run.reasons


def test_a_composition_refused_for_its_cost_is_never_computed(monkeypatch):
    """The cost check reads the composed kernel's shape: a refused pair (fastvit_t8's depthwise 7x7 then its
    expanding 1x1, 21.7M weights to compose for 0.46M, three rounds) costs nothing; computing each was 8.6 s of
    that model's backend compile."""
    from fxreparam import algebra

    computed = []
    compose = algebra.compose
    monkeypatch.setattr(algebra, "compose", lambda *a: computed.append(a) or compose(*a))
    model = nn.Sequential(nn.Conv2d(16, 16, 7, padding=3, groups=16), nn.Conv2d(16, 48, 1),
                          nn.Flatten(), nn.Linear(48 * 36, 8), nn.Linear(8, 4000))
    run = run_pass("sequential", model, torch.randn(1, 16, 6, 6))
    assert run.rewrites == 0 and "weights" in run.reasons and computed == []


def test_shapes_of_compositions_are_known_before_computing_them():
    from fxreparam import algebra

    for outer, go, inner, gi in [((8, 2, 3, 3), 4, (8, 8, 1, 1), 1), ((24, 16, 1, 1), 1, (16, 1, 7, 7), 16),
                                 ((8, 8, 1, 1), 1, (8, 4, 3, 3), 1), ((5, 7), 1, (7, 3), 1)]:
        weight, groups = algebra.compose(torch.randn(outer), go, torch.randn(inner), gi)
        assert algebra.composed_shape(outer, go, inner, gi) == (tuple(weight.shape), groups)


def test_pointwise_with_bias_then_zero_padded_kxk_is_refused():
    run = run_pass("sequential", nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)),
                   torch.randn(1, 4, 5, 5))
    assert run.rewrites == 0 and "bias" in run.reasons


class _Cropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3)

    def forward(self, x):
        return self.b(F.pad(self.a(x), [-1, -1, -1, -1]))


def test_negative_pad_between_layers_never_becomes_negative_padding():
    run = run_pass("sequential", _Cropped(), torch.randn(1, 3, 8, 8))
    assert run.error < 1e-6
    assert all(min(m.padding) >= 0 for m in run.layers(nn.Conv2d))


def test_linear_pair_composes_when_cheaper():
    run = run_pass("sequential", nn.Sequential(nn.Linear(8, 2), nn.Linear(2, 3)), torch.randn(4, 8))
    assert run.rewrites == 0  # 8*2 + 2*3 = 22 < 8*3 = 24
    run = run_pass("sequential", nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2)), torch.randn(4, 3))
    assert (run.rewrites, run.count("linear"), run.error < 1e-6) == (1, 1, True)


class _LowRankLinear(nn.Module):
    """``base(x) + B(A(x))`` on the last dim (LoRA on a Linear): the product is 16x16, larger than A and B, but the
    base layer of the same input and width absorbs it."""

    def __init__(self, shared: bool = False, other_input: bool = False) -> None:
        super().__init__()
        self.base, self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 2, bias=False), nn.Linear(2, 16, bias=False)
        self.shared, self.other_input = shared, other_input

    def forward(self, x):
        y = self.base(x.flip(-1) if self.other_input else x)
        out = y + self.b(self.a(x))
        return (out, y.mean()) if self.shared else out


def _run_to_fixpoint(model: nn.Module, x: torch.Tensor, names: list[str]):
    from torch.fx.passes.shape_prop import ShapeProp

    from fxreparam.pipeline import run_passes
    from fxreparam.registry import resolve

    gm = torch.fx.symbolic_trace(model.eval())
    ShapeProp(gm).propagate(x)
    log = run_passes(gm, resolve(names))
    gm.recompile()
    return gm, log


def test_linear_pair_a_summed_linear_absorbs_is_composed_provisionally():
    from fxreparam.graph import provisional

    run = run_pass("sequential", _LowRankLinear(), torch.randn(2, 5, 16))  # a rank-3 input: tokens
    assert (run.rewrites, run.count("linear"), run.error < 1e-6) == (1, 2, True)
    composed = [n for n in run.gm.graph.nodes if provisional(n) is not None]  # restorable until the sum folds
    assert [tuple(run.gm.get_submodule(str(n.target)).weight.shape) for n in composed] == [(16, 16)]


def test_linear_pair_a_summed_linear_absorbs_folds_into_it():
    model, x = _LowRankLinear().eval(), torch.randn(2, 5, 16)
    gm, log = _run_to_fixpoint(model, x, ["sequential", "branch_sum", "cleanup", "settle_provisional"])
    (layer,) = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    assert tuple(layer.weight.shape) == (16, 16) and log.stats["settle_provisional"].rewrites == 0
    torch.testing.assert_close(gm(x), model(x))


def test_linear_pair_restored_when_the_sum_does_not_fold():
    model, x = _LowRankLinear(shared=True).eval(), torch.randn(4, 16)  # the base's output is also read alone
    gm, log = _run_to_fixpoint(model, x, ["sequential", "branch_sum", "cleanup", "settle_provisional"])
    assert log.stats["settle_provisional"].rewrites == 1 and not log.unsettled
    shapes = sorted(tuple(m.weight.shape) for m in gm.modules() if isinstance(m, nn.Linear))
    assert shapes == [(2, 16), (16, 2), (16, 16)]  # the pair again, not a second 16x16
    assert any("not composed" in r.reason and "absorbs" in r.reason for r in log.refusals)
    torch.testing.assert_close(gm(x)[0], model(x)[0])


def test_linear_pair_nothing_absorbs_is_refused_as_costlier():
    run = run_pass("sequential", _LowRankLinear(other_input=True), torch.randn(4, 16))  # base reads another tensor
    assert run.rewrites == 0 and "no linear of the same input" in run.reasons
    assert all(r.declined for r in run.refusals)


def _dw(c: int, k, padding=0, stride=1, dilation=1, bias: bool = False, groups: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(c, c, k, stride=stride, padding=padding, dilation=dilation, groups=c if groups is None else groups,
                     bias=bias)


class _Separable(nn.Module):
    """``full(x) + second(first(x))`` (RepNeXt-style decomposed kernel), the pair optionally with a BN after each,
    and its first output optionally read alone too (so the sum cannot fold)."""

    def __init__(self, full: nn.Module | None, first: nn.Module, second: nn.Module, shared: bool = False) -> None:
        super().__init__()
        self.full, self.first, self.second, self.shared = full, first, second, shared

    def forward(self, x):
        y = self.second(self.first(x))
        if self.full is None:
            return y
        f = self.full(x)
        return (f + y, f.mean()) if self.shared else f + y


_FOLD = ["conv_bn", "sequential", "branch_sum", "cleanup", "settle_provisional"]


def _fold(model: nn.Module, x: torch.Tensor):
    from fxreparam.testing import randomize_batch_norms

    model = randomize_batch_norms(model).eval()
    gm, log = _run_to_fixpoint(model, x, _FOLD)
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        out, ref = gm(x), model(x)
    out, ref = (out[0], ref[0]) if isinstance(ref, tuple) else (out, ref)
    return convs, log, float((out - ref).abs().max() / ref.abs().max())


def test_separable_depthwise_pair_in_a_sum_with_a_kxk_folds_to_one_conv():
    model = _Separable(_dw(8, 3, 1, bias=True), _dw(8, (1, 3), (0, 1)), _dw(8, (3, 1), (1, 0)))
    run = run_pass("sequential", model, torch.randn(2, 8, 9, 9))  # the composition alone: provisional, exact
    assert (run.rewrites, run.count("conv"), run.error < 1e-6) == (1, 2, True)
    convs, log, error = _fold(model, torch.randn(2, 8, 9, 9))
    assert [(tuple(c.weight.shape), c.padding, c.groups) for c in convs] == [((8, 1, 3, 3), (1, 1), 8)]
    assert error < 1e-6 and log.stats["settle_provisional"].rewrites == 0


def test_separable_pair_in_the_other_order_folds():
    model = _Separable(_dw(8, 3, 1), _dw(8, (3, 1), (1, 0)), _dw(8, (1, 3), (0, 1)))
    convs, _, error = _fold(model, torch.randn(2, 8, 7, 10))
    assert len(convs) == 1 and error < 1e-6


def test_dense_separable_pair_folds():
    model = _Separable(nn.Conv2d(6, 6, 5, padding=2), nn.Conv2d(6, 6, (1, 5), padding=(0, 2), bias=False),
                       nn.Conv2d(6, 6, (5, 1), padding=(2, 0)))
    convs, _, error = _fold(model, torch.randn(2, 6, 8, 8))
    assert [tuple(c.weight.shape) for c in convs] == [(6, 6, 5, 5)] and error < 1e-6


def test_smaller_separable_pair_folds_into_a_larger_kxk_strided():
    # RepNeXt's stride-2 form: the 1xk strides along the axis its kernel spans, the kx1 along the other.
    model = _Separable(_dw(8, 7, 3, stride=2), _dw(8, (1, 5), (0, 2), stride=(1, 2)), _dw(8, (5, 1), (2, 0), (2, 1)))
    convs, _, error = _fold(model, torch.randn(2, 8, 15, 12))
    assert [(tuple(c.weight.shape), c.stride) for c in convs] == [((8, 1, 7, 7), (2, 2))] and error < 1e-6


def test_separable_pair_with_a_bn_after_each_conv():
    # The outer conv does not zero-pad (the inner's BN shift reaches every tap): exact with both biases.
    model = _Separable(nn.Sequential(_dw(8, 3, (0, 1)), nn.BatchNorm2d(8)),
                       nn.Sequential(_dw(8, (1, 3), (0, 1)), nn.BatchNorm2d(8)),
                       nn.Sequential(_dw(8, (3, 1)), nn.BatchNorm2d(8)))
    convs, _, error = _fold(model, torch.randn(2, 8, 9, 9))
    assert len(convs) == 1 and error < 1e-6


def test_separable_pair_whose_outer_pads_the_inner_bias_is_refused():
    model = _Separable(nn.Sequential(_dw(8, 3, 1), nn.BatchNorm2d(8)),
                       nn.Sequential(_dw(8, (1, 3), (0, 1)), nn.BatchNorm2d(8)),
                       nn.Sequential(_dw(8, (3, 1), (1, 0)), nn.BatchNorm2d(8)))
    convs, log, error = _fold(model, torch.randn(2, 8, 9, 9))
    assert len(convs) == 3 and error < 1e-6
    (refusal,) = [r for r in log.refusals if r.pass_name == "sequential"]
    assert not refusal.declined and "bias" in refusal.reason


def test_separable_pair_not_in_a_sum_stays_and_is_listed():
    run = run_pass("sequential", _Separable(None, _dw(8, (1, 3), (0, 1)), _dw(8, (3, 1), (1, 0))),
                   torch.randn(2, 8, 9, 9))
    assert run.rewrites == 0 and run.count("conv") == 2
    (refusal,) = run.refusals
    assert refusal.declined and "not composed" in refusal.reason and "no conv of the same input" in refusal.reason


def test_kxk_pair_whose_inner_output_border_is_not_zero_is_refused():
    # 3x3 (padding 1) then 3x3 (padding 1): the outer's zero rows are not the inner's output continued (a 5x5
    # with padding 2 would read the inner's taps on the input's first rows there).
    run = run_pass("sequential", _Separable(_dw(8, 5, 2), _dw(8, 3, 1), _dw(8, 3, 1)), torch.randn(2, 8, 9, 9))
    assert run.rewrites == 0
    (refusal,) = run.refusals
    assert not refusal.declined and "past its border" in refusal.reason


def test_kxk_pair_whose_inner_pads_fully_composes():
    # The inner pads by its kernel less one: its output continued past its border is zero, as the outer pads.
    run = run_pass("sequential", _Separable(_dw(8, 5, 3), _dw(8, 3, 2), _dw(8, 3, 1)), torch.randn(2, 8, 9, 9))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


def test_separable_compositions_are_exact_across_strides_dilations_groups():
    """Each pair the rule accepts (it composes provisionally, a conv of the composed size beside it) equals its
    composition; the rest are refused as not exact, never applied."""
    torch.manual_seed(0)
    composed = refused = 0
    for case in range(40):
        g = torch.randint(0, 3, ()).item()
        groups = (1, 2, 4)[g]
        ki, ko = torch.randint(1, 4, (2, 2)).tolist()
        pi, po = torch.randint(0, 3, (2, 2)).tolist()
        si, so = torch.randint(1, 3, (2, 2)).tolist()
        di, do = torch.randint(1, 3, (2, 2)).tolist()
        if ki == [1, 1] or ko == [1, 1]:
            continue
        first = nn.Conv2d(4, 4, ki, stride=si, padding=pi, dilation=di, groups=groups, bias=False)
        second = nn.Conv2d(4, 4, ko, stride=so, padding=po, dilation=do, groups=(1, 2, 4)[(g + case) % 3])
        size = [do[a] * si[a] * (ko[a] - 1) + di[a] * (ki[a] - 1) + 1 for a in range(2)]
        full = nn.Conv2d(4, 4, size, stride=[si[a] * so[a] for a in range(2)],
                         padding=[pi[a] + si[a] * po[a] for a in range(2)])
        run = run_pass("sequential", _Separable(full, first, second), torch.randn(1, 4, 13, 13))
        if run.rewrites:
            composed += 1
            assert run.error < 1e-6, case
        else:
            refused += 1
            assert run.refusals and not run.refusals[0].declined, case
    assert composed >= 5 and refused >= 5


def test_separable_pair_restored_when_the_sum_does_not_fold():
    model = _Separable(_dw(8, 3, 1), _dw(8, (1, 3), (0, 1)), _dw(8, (3, 1), (1, 0)), shared=True)
    convs, log, error = _fold(model, torch.randn(2, 8, 9, 9))
    assert log.stats["settle_provisional"].rewrites == 1 and not log.unsettled
    assert sorted(tuple(c.weight.shape) for c in convs) == [(8, 1, 1, 3), (8, 1, 3, 1), (8, 1, 3, 3)]
    assert any("not composed" in r.reason for r in log.refusals) and error < 1e-6
