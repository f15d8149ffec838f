"""``branch_sum`` alone: summed conv, BN and pool branches of one input become one conv, where aligned."""

import torch
from torch import nn

from fxreparam.testing import run_pass


class Branches(nn.Module):
    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return sum(b(x) for b in self.branches)


def cbn(cin, cout, k, padding, groups=1, dims=2):
    conv = (nn.Conv1d, nn.Conv2d)[dims - 1](cin, cout, k, padding=padding, groups=groups)
    return nn.Sequential(conv, (nn.BatchNorm1d, nn.BatchNorm2d)[dims - 1](cout))


def test_repvgg_branches_merge():
    model = Branches(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    run = run_pass("branch_sum", model, torch.randn(1, 4, 5, 5))
    assert (run.rewrites, run.count("conv"), run.error < 1e-6) == (1, 1, True)


def test_depthwise_branches_stay_depthwise():
    model = Branches(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, 1, groups=6))
    run = run_pass("branch_sum", model, torch.randn(1, 6, 5, 5))
    (conv,) = run.layers(nn.Conv2d)
    assert (conv.groups, run.error < 1e-6) == (6, True)


def test_asymmetric_branches_alone_would_grow_the_kernel_and_are_refused():
    model = Branches(nn.Conv2d(4, 4, (1, 3), padding=(0, 1)), nn.Conv2d(4, 4, (3, 1), padding=(1, 0)))
    run = run_pass("branch_sum", model, torch.randn(1, 4, 5, 5))
    assert run.rewrites == 0 and "weights" in run.reasons


def test_misaligned_centers_are_refused():
    model = Branches(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 2, stride=2))
    run = run_pass("branch_sum", model, torch.randn(1, 4, 6, 6))
    assert run.rewrites == 0 and "center" in run.reasons


def test_unbatched_conv1d_branches_merge():
    model = Branches(nn.Conv1d(3, 3, 3, padding=1), nn.Conv1d(3, 3, 1))
    run = run_pass("branch_sum", model, torch.randn(3, 7))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


def test_dilated_branches_merge_into_the_large_kernel():
    """REPARAM §10 (UniRepLKNet): 7x7 + 3x3 at dilation 2 (5x5 wide) + 3x3 at dilation 3 (7x7 wide), centers
    aligned, are one 7x7 conv that costs no more than the 7x7 alone."""
    model = Branches(nn.Conv2d(4, 4, 7, padding=3, groups=4), nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),
                     nn.Conv2d(4, 4, 3, padding=3, dilation=3, groups=4))
    run = run_pass("branch_sum", model, torch.randn(1, 4, 12, 12))
    (conv,) = run.layers(nn.Conv2d)
    assert (conv.kernel_size, conv.dilation, conv.groups, run.error < 1e-6) == ((7, 7), (1, 1), 4, True)


def test_dilated_branch_wider_than_the_others_is_refused_as_costlier():
    model = Branches(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=3, dilation=3))
    run = run_pass("branch_sum", model, torch.randn(1, 4, 9, 9))
    assert run.rewrites == 0 and "weights" in run.reasons


class _CroppedACNet(nn.Module):
    """ACNet with padding < k // 2: the 1xK and Kx1 branches read a cropped input (REPARAM §10)."""

    def __init__(self, padding: int):
        super().__init__()
        self.square = nn.Conv2d(4, 4, 3, padding=padding)
        self.hor = nn.Conv2d(4, 4, (1, 3), padding=(0, padding))
        self.ver = nn.Conv2d(4, 4, (3, 1), padding=(padding, 0))
        self.crop = 1 - padding

    def forward(self, x):
        c = self.crop
        if c == 0:
            return self.square(x) + self.hor(x) + self.ver(x)
        return self.square(x) + self.hor(x[:, :, c:-c, :]) + self.ver(x[:, :, :, c:-c])


def test_acnet_with_cropped_branches_merges_after_export():
    import fxreparam

    model = _CroppedACNet(padding=0).eval()
    x = torch.randn(2, 4, 9, 9)
    folded = fxreparam.optimize(model, x, passes=["branch_sum", "cleanup"])
    rep = fxreparam.report(folded)
    assert (rep.after.conv, rep.after.add_sub, rep.verification.ok) == (1, 0, True)
    assert [m.padding for m in folded.modules() if isinstance(m, nn.Conv2d)] == [(0, 0)]


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.head_dist = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        return (self.head(x) + self.head_dist(x)) / 2


def test_summed_linear_heads_become_one_linear():
    run = run_pass("branch_sum", _TwoHeads(), torch.randn(4, 8))
    assert (run.rewrites, run.count("linear"), run.count("add_sub"), run.error < 1e-6) == (1, 1, 0, True)


def test_a_dilated_branch_refused_for_its_padding_mode_stays_in_the_sum():
    """Found by the property test: a branch refused after being spread to dilation 1 must keep its term."""
    model = Branches(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 5, padding=2, padding_mode="reflect"),
                     nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2))
    run = run_pass("branch_sum", model, torch.randn(1, 4, 9, 9))
    assert (run.rewrites, run.count("conv"), run.error < 1e-6) == (1, 2, True)
    assert "padding modes differ" in run.reasons


class _TwoNorms(nn.Module):
    """Found by the fuzzer: two BN-only branches of one tensor and no conv must not become a new conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_sum_of_norms_without_a_conv_stays_elementwise():
    run = run_pass("branch_sum", _TwoNorms(), torch.randn(2, 3, 5))
    assert (run.rewrites, run.count("conv")) == (0, 0)


def test_the_merged_conv_carries_the_sum_s_shape_not_its_first_reader_s():
    """A shape query (``x.shape[0]``) that reads the source first must not lend its metadata to the merged conv:
    the report counts the merged conv's MACs from the shape it records."""
    import fxreparam
    from fxreparam.testing import executed_ops

    class SumThenFlatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)

        def forward(self, x):
            n = x.shape[0]
            return (self.a(x) + self.b(x)).reshape(n, -1)

    x = torch.randn(2, 3, 16, 16)
    folded = fxreparam.optimize(SumThenFlatten().eval(), x)
    assert fxreparam.report(folded).after.macs == executed_ops(folded, x)["macs"] // 2 == 8 * 27 * 256


class _Decomposed(nn.Module):
    """SLaK's decomposed kernel, small: a kx3 and a 3xk conv and a 3x3 conv of one input, each with a BN."""

    def __init__(self, k: int = 9, groups: int = 1, identity: bool = False):
        super().__init__()
        self.tall = cbn(4, 4, (k, 3), (k // 2, 1), groups)
        self.wide = cbn(4, 4, (3, k), (1, k // 2), groups)
        self.small = cbn(4, 4, 3, 1, groups)
        self.identity = identity

    def forward(self, x):
        y = self.tall(x) + self.wide(x) + self.small(x)
        return y + x if self.identity else y


def _stored_after(run) -> int:
    from fxreparam import cost

    return cost.graph_cost(run.gm).weights


def _stored_before(model: nn.Module, x: torch.Tensor) -> int:
    from fxreparam import cost
    from fxreparam.capture import capture as capture_graph

    return cost.graph_cost(capture_graph(model.eval(), (x,), None, "export").gm).weights


def test_a_sum_too_costly_to_merge_whole_merges_what_fits_inside_a_larger_kernel():
    """9x3 + 3x9 + 3x3 as one 9x9 would store 81 > 27 + 27 + 9 taps: the 3x3 merges into a 9x3 (it adds nothing
    there, docs/identities.md s3) and the 3x9 stays a branch; the report says which merged and why the other not."""
    for groups, identity in [(1, False), (4, False), (1, True)]:
        model, x = _Decomposed(groups=groups, identity=identity), torch.randn(2, 4, 11, 11)
        run = run_pass("branch_sum", model, x)
        assert (run.rewrites, run.count("conv"), run.error < 1e-5) == (1, 2, True), (groups, identity)
        assert _stored_after(run) <= _stored_before(model, x)
        assert "merged" in run.reasons and "kept" in run.reasons and "weights" in run.reasons


def test_a_sum_cheap_enough_to_merge_whole_still_merges_whole():
    """7x3 + 3x7 + 3x3 as one 7x7 stores 49 <= 21 + 21 + 9 taps: one conv, as before."""
    model, x = _Decomposed(k=7), torch.randn(2, 4, 11, 11)
    run = run_pass("branch_sum", model, x)
    assert (run.rewrites, run.count("conv"), run.error < 1e-5) == (1, 1, True)


def test_a_sum_where_no_kernel_holds_another_stays_with_its_decline_reason():
    model = Branches(cbn(4, 4, (1, 5), (0, 2)), cbn(4, 4, (5, 1), (2, 0)))
    run = run_pass("branch_sum", model, torch.randn(1, 4, 7, 7))
    assert (run.rewrites, run.count("conv")) == (0, 2)
    assert "weights" in run.reasons and "kept" in run.reasons
