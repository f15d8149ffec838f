"""``identity`` alone: ``x + conv(x)`` becomes one conv with a Dirac kernel added (REPARAM §4); ``x + x`` stays.

Then the same identity written into a weight (DiracNet, weight norm, parametrizations) through ``optimize``.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import count_kind, fold
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import fxreparam
from fxreparam.demo import DiracConv2d, DiracNet
from fxreparam.testing import run_pass


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def test_residual_folds_into_the_conv():
    run = run_pass("identity", Residual(nn.Conv2d(4, 4, 3, padding=1)), torch.randn(1, 4, 5, 5))
    assert (run.rewrites, run.count("add_sub"), run.error < 1e-6) == (1, 0, True)


def test_residual_on_an_unbatched_input_folds():
    run = run_pass("identity", Residual(nn.Conv2d(4, 4, 3, padding=1)), torch.randn(4, 5, 5))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


def test_residual_around_a_grouped_conv_folds_per_group():
    run = run_pass("identity", Residual(nn.Conv2d(4, 4, 3, padding=1, stride=1, dilation=1, groups=2)),
                   torch.randn(1, 4, 5, 5))
    assert (run.rewrites, run.error < 1e-6) == (1, True)


def test_sum_of_a_tensor_with_itself_stays_elementwise():
    run = run_pass("identity", Residual(nn.Identity()), torch.randn(1, 4, 5, 5))
    assert run.rewrites == 0


# ----------------------------------------------------------- Dirac-parameterized convs, through optimize
# The identity written into the weight (REPARAM §5: DiracNet, weight norm, parametrizations): fold_constants
# evaluates it.


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_dirac_conv_then_bn_becomes_one_conv(capture):
    model = nn.Sequential(DiracConv2d(6, 6), nn.BatchNorm2d(6))
    folded = fold(model, torch.randn(2, 6, 8, 8), capture=capture)
    rep = fxreparam.report(folded)
    assert rep.rewrites["fold_constants"] >= 1 and rep.after.batch_norm == 0
    assert rep.after.conv == 1 and rep.after.mul_div == 0 and rep.after.add_sub == 0
    assert count_kind(folded, nn.Conv2d) == 1


def test_diracnet18_folds_to_a_plain_chain():
    model = DiracNet(depth=18, width=0.25, num_classes=10)
    folded = fold(model, torch.randn(1, 3, 64, 64))
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 0 and rep.after.add_sub == 0 and rep.after.mul_div == 0
    assert rep.after.conv == 17 and count_kind(folded, nn.Conv2d) == 17
    assert "Conv2d(32, 16, kernel_size=(3, 3)" in str(folded)


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_weight_norm_parametrization(capture):
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))
    folded = fold(model, torch.randn(2, 3, 6, 6), capture=capture)
    assert fxreparam.report(folded).after.batch_norm == 0
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    assert not any("original" in name for name, _ in folded.named_parameters())


def test_custom_parametrization_is_evaluated():
    class Symmetric(nn.Module):
        def forward(self, w):
            return (w + w.transpose(-1, -2)) / 2

    conv = nn.Conv2d(3, 3, 3)
    parametrize.register_parametrization(conv, "weight", Symmetric())
    folded = fold(nn.Sequential(conv, nn.BatchNorm2d(3)), torch.randn(2, 3, 6, 6))
    w = dict(folded.named_parameters())
    assert len([k for k in w if k.endswith("weight")]) == 1


def test_random_weights_are_not_frozen():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.w + 0 * torch.randn(4, 3, 3, 3))

    model = Noisy().eval()
    folded = fxreparam.optimize(model, torch.randn(1, 3, 5, 5), capture="export")
    assert fxreparam.report(folded).rewrites["fold_constants"] == 0
    assert "randn" in folded.code


def test_branch_sum_inside_a_dirac_parameterized_net():
    class DiracRepBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.dirac = DiracConv2d(6, 6)
            self.pointwise = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            return torch.relu(self.bn(self.dirac(x) + self.pointwise(x)))

    folded = fold(nn.Sequential(DiracRepBlock(), DiracRepBlock()), torch.randn(2, 6, 8, 8))
    rep = fxreparam.report(folded)
    assert rep.after.conv == 2 and rep.after.batch_norm == 0 and rep.after.add_sub == 0


class _RandomWeight(nn.Module):
    """A conv whose weight is drawn anew at every call by an op that carries no random tag of its own."""

    def __init__(self, draw):
        super().__init__()
        self.rate, self.draw = nn.Parameter(torch.rand(4, 3, 3, 3) + 0.5), draw

    def forward(self, x):
        return F.conv2d(x, self.draw(self.rate))


@pytest.mark.parametrize("draw", [lambda w: F.dropout2d(w, 0.5, True), lambda w: F.gumbel_softmax(w, dim=1),
                                  lambda w: F.feature_alpha_dropout(w, 0.5, True)],
                         ids=["dropout2d", "gumbel_softmax", "feature_alpha_dropout"])
def test_weights_drawn_by_untagged_random_ops_are_not_frozen(draw):
    model, x = _RandomWeight(draw).eval(), torch.randn(1, 3, 5, 5)
    folded = fxreparam.optimize(model, None, verify=False)  # symbolic_trace: no shapes, no verification
    with torch.no_grad():
        calls = [folded(x) for _ in range(3)]
    assert fxreparam.report(folded).rewrites["fold_constants"] == 0 or any(
        not torch.equal(calls[0], c) for c in calls[1:])
    assert any(t in folded.code for t in ("dropout2d", "gumbel_softmax", "feature_alpha_dropout"))


def test_uninitialized_memory_is_not_a_constant():
    model = _RandomWeight(lambda w: w + 0 * w.new_empty(w.shape)).eval()
    folded = fxreparam.optimize(model, None, verify=False)
    assert "new_empty" in folded.code  # its contents are whatever the allocator returns: not a value to store
