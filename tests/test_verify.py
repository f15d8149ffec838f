"""The verifier cannot be fooled: per-channel errors, never on empty tensors, calibrated by the model's own rounding."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import fxreparam
import fxreparam.core
from fxreparam.finalize import finalize
from fxreparam.testing import randomize_batch_norms


def reference(model: nn.Module, *args: torch.Tensor, **options):
    """A :class:`fxreparam.verify.Reference` of ``model`` with its float64 twin, as ``optimize`` builds it."""
    from fxreparam.verify import Reference

    as64 = {k: t.double() for k, t in [*model.named_parameters(), *model.named_buffers()]}
    return Reference(model, args, original64=lambda *a, **k: functional_call(model, as64, a, k), **options)


class Scale(nn.Module):
    """``x * a - x * b``: ill-conditioned in float32 where ``a`` and ``b`` are large and close."""

    def __init__(self, a: float | torch.Tensor, b: float = 0.0):
        super().__init__()
        self.register_buffer("a", torch.as_tensor(a, dtype=torch.float32))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float32))

    def forward(self, x):
        return x * self.a - x * self.b


class SmallAndLargeChannel(nn.Module):
    """Two output channels; the second is 1e4 times larger than the first."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.register_buffer("scale", torch.tensor([1.0, 1e4]).view(1, 2, 1, 1))

    def forward(self, x):
        return self.bn(self.conv(x)) * self.scale


def corrupting_finalize(factor: float, channel: int = 0):
    """``finalize``, then scale one output channel of the last conv: a wrong result no pass is blamed for."""

    def corrupt(gm, **kwargs):
        folded = finalize(gm, **kwargs)
        conv = [m for m in folded.modules() if isinstance(m, nn.Conv2d)][-1]
        with torch.no_grad():
            conv.weight[channel] *= factor
            if conv.bias is not None:
                conv.bias[channel] *= factor
        return folded

    return corrupt


# ----------------------------------------------------------------------------- per channel


def test_unit_a_wrong_small_channel_next_to_a_large_one_fails():
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight[0] *= 1e4
    wrong = copy.deepcopy(conv)
    with torch.no_grad():
        wrong.weight[1] *= 1.38
        wrong.bias[1] *= 1.38
    ref = reference(conv, torch.randn(2, 3, 5, 5))
    assert ref.check(conv).ok
    result = ref.check(wrong)
    assert not result.ok and result.channel == 1 and 0.3 < result.error < 0.5
    assert "FAILED" in str(result) and "channel 1" in str(result)


def test_optimize_refuses_a_fold_with_one_wrong_small_channel(monkeypatch):
    model = SmallAndLargeChannel().eval()
    with torch.no_grad():  # statistics that are not the defaults, the same size for both channels
        model.bn.running_mean.copy_(torch.tensor([0.2, -0.1]))
        model.bn.running_var.copy_(torch.tensor([0.7, 1.3]))
    x = torch.randn(2, 3, 6, 6)
    monkeypatch.setattr(fxreparam.core, "finalize", corrupting_finalize(1.38, channel=0))
    with pytest.raises(fxreparam.VerificationError) as info:
        fxreparam.optimize(model, x)
    assert info.value.pass_name == "finalize" and info.value.error > info.value.tolerance


def test_one_dim_outputs_are_compared_per_element_against_the_output_scale():
    class Vector(nn.Module):
        def __init__(self, wrong: bool):
            super().__init__()
            self.register_buffer("w", torch.tensor([1e4, 1.0, 1.0]) * (torch.tensor([1, 3.0, 1]) if wrong else 1))

        def forward(self, x):
            return (x * self.w).sum(0)

    ref = reference(Vector(False), torch.randn(4, 3))
    assert ref.check(Vector(False)).ok
    result = ref.check(Vector(True))
    assert not result.ok and result.channel is None


# ----------------------------------------------------------------------------- never on an empty tensor


def test_unit_a_zero_size_example_is_never_ok_on_zero_elements():
    conv = nn.Conv2d(3, 4, 1)
    empty = torch.randn(0, 3, 4, 4)
    pinned = reference(conv, empty)  # the capture did not make dim 0 dynamic

    def only_empty(x):
        if x.shape[0]:
            raise RuntimeError("shape specialized to a batch of 0")
        return conv(x)

    result = pinned.check(only_empty)
    assert not result.ok and not result.checked and "NOT VERIFIED" in str(result)
    ran = pinned.check(conv)  # where the module runs at size 2 anyway, it is compared there
    assert ran.ok and ran.elements > 0 and "size 2" in str(ran)
    dynamic = reference(conv, empty, dynamic=[(0,)]).check(conv)
    assert dynamic.ok and dynamic.shapes == 2 and dynamic.elements > 0

    class Empty(nn.Module):
        def forward(self, x):
            return x[:, :0]

    nothing = reference(Empty(), torch.randn(2, 3)).check(Empty())
    assert not nothing.ok and not nothing.checked


def test_optimize_catches_a_wrong_result_although_the_example_is_empty(monkeypatch):
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))).eval()
    monkeypatch.setattr(fxreparam.core, "finalize", corrupting_finalize(2.0))
    with pytest.raises(fxreparam.VerificationError):
        fxreparam.optimize(model, torch.randn(0, 3, 6, 6))


# ----------------------------------------------------------------------------- calibrated by the model's rounding


def test_unit_an_exact_fold_of_an_ill_conditioned_model_passes():
    a = torch.tensor(1e4 + 1 / 3)
    original = Scale(a, 1e4)  # float32 rounds x * a at 1e4 scale; the result is ~0.33 x: ~1e-3 own error
    folded = Scale(torch.nextafter(a, torch.tensor(2e4)), 1e4)  # one ulp off, as a folded constant may be
    ref = reference(original, torch.randn(2, 3, 5, 5))
    result = ref.check(folded)
    assert result.ok and "own float32 rounding" in str(result)
    assert not ref.check(Scale(a * 1.01, 1e4)).ok  # 100x its own rounding: wrong


def test_unit_a_slightly_wrong_fold_of_a_well_conditioned_model_fails():
    ref = reference(Scale(2.0), torch.randn(2, 3, 5, 5))
    assert ref.check(Scale(2.0)).ok
    result = ref.check(Scale(2.0 * (1 + 3e-4)))  # 3x the float32 floor, 10,000x its rounding
    assert not result.ok and "floor" in str(result)


class IllConditioned(nn.Module):
    """Two relu branches ~1e4 large whose difference is ~1: an exact conv-BN fold stays ~1e-3 off in float32."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.other = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.conv.weight.normal_()
            self.conv.bias.fill_(5.0)
            self.bn.running_var.fill_(1e-6)  # a scale of 1e3
            self.bn.running_mean.fill_(0.0)
            scale = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
            self.other.weight.copy_(self.conv.weight * scale.view(-1, 1, 1, 1) * (1 + 1e-4))
            self.other.bias.copy_(self.conv.bias * scale)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) - torch.relu(self.other(x))


def test_optimize_accepts_an_exact_fold_of_an_ill_conditioned_model():
    model = IllConditioned().eval()
    x = torch.randn(2, 3, 6, 6)
    folded = fxreparam.optimize(model, x)  # the old float64 check refused it (rounded weights, amplified)
    rep = fxreparam.report(folded)
    assert rep.verification.ok and rep.after.batch_norm == 0
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())
        own = (model(x).double() - truth).norm()
        assert (folded(x).double() - truth).norm() <= 16 * own


# ----------------------------------------------------------------------------- every model that runs


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.linear = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, ids, x):
        return self.linear(self.embed(ids) + x)


def test_unit_integer_inputs_keep_their_values():
    model = Embed().eval()
    ids, x = torch.randint(0, 10, (3, 5)), torch.randn(3, 5, 4)
    ref = reference(model, ids, x, dynamic=[(0,), (0,)])
    assert ref.check(model).ok
    for a, _ in ref.sets:  # valid indices in every set, random floats only for the floating input
        assert a[0].dtype == torch.int64 and set(a[0].flatten().tolist()) <= set(ids.flatten().tolist())
    assert [tuple(a[1].shape) for a, _ in ref.sets] == [(3, 5, 4), (2, 5, 4)]  # the example; another batch
    assert not torch.equal(ref.sets[1][0][1], x)


def test_optimize_verifies_integer_inputs():
    folded = fxreparam.optimize(Embed().eval(), (torch.randint(0, 10, (3, 5)), torch.randn(3, 5, 4)))
    assert fxreparam.report(folded).verification.ok


class CastInForward(nn.Module):
    """float64 weights, a ``.float()`` in forward and a bfloat16 tail: no float64 copy of it runs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.b = nn.Linear(6, 5).to(torch.bfloat16)

    def forward(self, x):
        return self.b(self.a(x.float()).to(torch.bfloat16))


def test_optimize_verifies_casts_in_forward_and_mixed_precision():
    model = randomize_batch_norms(CastInForward()).eval()
    folded = fxreparam.optimize(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    rep = fxreparam.report(folded)
    assert rep.verification.ok and rep.verification.elements > 0 and rep.after.batch_norm == 0


class NonFinite(nn.Module):
    def __init__(self, out: str = "inf"):
        super().__init__()
        self.out = out

    def forward(self, x):
        y = x / 0.0  # +-inf where x != 0
        if self.out == "nan":
            y = torch.where(torch.isinf(y), torch.nan, y)
        elif self.out == "finite":
            y = torch.nan_to_num(y)
        return torch.cat([x, y], 1)


def test_unit_inf_and_nan_match_only_in_the_same_places_with_the_same_values():
    ref = reference(NonFinite(), torch.randn(2, 3, 4))
    same = ref.check(NonFinite())
    assert same.ok and same.elements > 0
    assert not ref.check(NonFinite("nan")).ok  # nan where the original gives +-inf
    assert not ref.check(NonFinite("finite")).ok


def test_unit_structure_dtype_and_a_crashing_candidate_fail():
    model = nn.Linear(3, 2)
    ref = reference(model, torch.randn(4, 3))
    assert not ref.check(lambda x: (model(x),)).ok
    assert not ref.check(lambda x: model(x).double()).ok
    crashed = ref.check(lambda x: x.view(-1, 7))
    assert not crashed.ok and math.isinf(crashed.error) and "raised" in str(crashed)


def test_unit_a_model_that_does_not_run_in_float64_is_checked_against_its_own_dtype():
    class Float32Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            assert self.linear.weight.dtype == torch.float32
            return self.linear(x)

    model = Float32Only()
    result = reference(model, torch.randn(4, 3)).check(model)
    assert result.ok and "float64" in str(result) and "floor" in str(result)


# ----------------------------------------------------------------------------- cost


def test_optimize_copies_the_model_once_and_runs_float64_only_when_the_quick_check_cannot_settle_it():
    copies, calls = [], []

    class Counted(nn.Sequential):
        def __deepcopy__(self, memo):
            copies.append(1)
            clone = Counted(*[copy.deepcopy(m, memo) for m in self])
            return clone

        def forward(self, x):
            calls.append(x.dtype)
            return super().forward(x)

    model = randomize_batch_norms(Counted(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))).eval()
    rep = fxreparam.report(fxreparam.optimize(model, torch.randn(1, 3, 6, 6)))
    assert len(copies) == 1  # the working copy; the float64 twin converts its tensors only
    assert rep.verification.ok and rep.verification.trials == 2 and rep.verification.shapes == 2
    assert torch.float64 not in calls  # an exact fold is well within the floor of the float32 original
    # The example's own run is shared by capture's batch-of-two check and the verification: export traces with
    # fake tensors, then the model runs once on the example and once on the random set.
    assert len(calls) == 3


def test_unit_float64_runs_once_where_the_quick_check_cannot_settle_it():
    calls = []

    class Counted(Scale):
        def forward(self, x):
            calls.append(x.dtype)
            return super().forward(x)

    ref = reference(Counted(2.0), torch.randn(2, 3, 5, 5))
    assert ref.check(Scale(2.0)).ok and torch.float64 not in calls
    within = ref.check(Scale(2.0 * (1 + 9.5e-5)))  # over the quick check's share of the floor, under the floor
    assert within.ok and "floor" in str(within) and calls.count(torch.float64) == len(ref.sets)
    assert not ref.check(Scale(2.0 * (1 + 3e-4))).ok and calls.count(torch.float64) == len(ref.sets)  # run once


@settings(max_examples=60, deadline=None)
@given(st.floats(-6, -1), st.floats(0, 1e4), st.integers(0, 3))
def test_the_quick_check_never_accepts_what_the_full_check_refuses(log_error, a, seed):
    """Property: where the quick check (against the float32 original) passes, the float64 check passes too."""
    from fxreparam import verify

    torch.manual_seed(seed)
    original = Scale(torch.tensor(a + 1 / 3), a)  # ill-conditioned for large ``a``
    candidate = Scale(torch.tensor(a + 1 / 3) * (1 + 10 ** log_error), a)
    ref = reference(original, torch.randn(2, 3, 4, 4))
    quick = ref.check(candidate)
    full = ref._compare([(i, candidate(*args), "") for i, (args, _) in enumerate(ref.sets)], ref.outputs64, [], 1.0,
                        calibrated=ref.calibrated)
    assert verify.QUICK < (verify.K - 1) / verify.K
    if "no float64 run needed" in quick.basis:
        assert quick.ok and full.ok


def test_verification_line_says_what_was_allowed_and_why():
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))).eval()
    rep = fxreparam.report(fxreparam.optimize(model, torch.randn(2, 3, 6, 6)))
    line = next(line for line in str(rep).splitlines() if line.startswith("verification:"))
    assert line.startswith("verification: ok: worst channel relative error") and "allowed" in line
    assert "inputs" in line and "shape" in line
