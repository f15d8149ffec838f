"""The public API: optimize's contract, capture paths, verification, the report and the registry."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import count_kind, fold, rel_err
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms


def conv_bn_relu(cin=3, cout=8):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn_relu(), conv_bn_relu()

    def forward(self, x, y):
        return {"sum": self.a(x) + self.b(y), "pair": (self.a(y), x.mean())}


def test_does_not_touch_the_users_model():
    model = randomize_batch_norms(conv_bn_relu()).train()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="training mode"):
        folded = fxreparam.optimize(model, torch.randn(2, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(model._forward_hooks) == 1
    # Nothing of the original is shared with the result.
    original = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not original & {t.untyped_storage().data_ptr() for t in [*folded.parameters(), *folded.buffers()]}


def test_eval_model_gives_no_warning():
    model = randomize_batch_norms(conv_bn_relu()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxreparam.optimize(model, torch.randn(2, 3, 8, 8))


def test_several_inputs_dict_and_tuple_outputs_and_a_module_called_twice():
    model = randomize_batch_norms(TwoInTwoOut()).eval()
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    folded = fxreparam.optimize(model, (x, y))
    out, ref = folded(x, y), model(x, y)
    assert set(out) == {"sum", "pair"} and isinstance(out["pair"], tuple)
    assert rel_err(ref, out) < 1e-5
    rep = fxreparam.report(folded)
    assert rep.after.batch_norm == 0 and rep.after.conv == 3 and rep.rewrites["conv_bn"] == 3
    # ``a`` runs twice and folds the same way at both calls: one stored kernel, not two.
    assert count_kind(folded, nn.Conv2d) == 2 and rep.after.parameters < rep.before.parameters


def test_other_batch_size_runs_where_capture_allows_it():
    model = randomize_batch_norms(conv_bn_relu()).eval()
    folded = fxreparam.optimize(model, torch.randn(4, 3, 8, 8))
    x = torch.randn(7, 3, 8, 8)
    assert rel_err(model(x), folded(x)) < 1e-5


def test_without_example_inputs_uses_symbolic_trace_and_says_it_did_not_verify():
    model = randomize_batch_norms(conv_bn_relu()).eval()
    folded = fxreparam.optimize(model)
    rep = fxreparam.report(folded)
    assert rep.capture == "torch.fx.symbolic_trace" and rep.verification is None
    assert "no example inputs" in str(rep)
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(model(x), folded(x)) < 1e-5


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -x


def test_capture_error_names_both_tracers_and_the_remedy():
    with pytest.raises(fxreparam.CaptureError) as info:
        fxreparam.optimize(DataDependent().eval(), torch.randn(1, 3, 4, 4))
    message = str(info.value)
    assert "torch.export" in message and "symbolic_trace" in message and "Remedy" in message
    with pytest.raises(fxreparam.CaptureError, match="example inputs"):
        fxreparam.optimize(DataDependent().eval())


def test_verification_error_names_the_pass_that_broke_the_model():
    @fxreparam.register_pass("double_every_conv", "a deliberately wrong rewrite, for this test", after="conv_bn")
    def double_every_conv(ctx, node):
        layer = fxreparam.ops.conv(ctx.gm, node)
        if layer is None or node.meta.get("doubled"):
            return False
        new = fxreparam.emit(ctx.gm, layer.spec, layer.weight * 2, layer.bias, input=layer.input, replaces=node,
                             storage=layer.storage)
        new.meta["doubled"] = True
        return True

    try:
        model = randomize_batch_norms(conv_bn_relu()).eval()
        with pytest.raises(fxreparam.VerificationError) as info:
            fxreparam.optimize(model, torch.randn(1, 3, 8, 8))
        assert info.value.pass_name == "double_every_conv"
        assert "double_every_conv" in str(info.value) and info.value.error > info.value.tolerance
        folded = fxreparam.optimize(model, torch.randn(1, 3, 8, 8), skip=["double_every_conv"])
        assert fxreparam.report(folded).verification.ok
    finally:
        fxreparam.unregister_pass("double_every_conv")


def test_registry_lists_passes_in_order_with_descriptions():
    passes = fxreparam.list_passes()
    names = [p.name for p in passes]
    assert names == list(fxreparam.BUILTIN_ORDER)
    assert names[0] == "inference_identities" and names[-2:] == ["cleanup", "settle_provisional"]
    assert names.index("fold_constants") < names.index("conv_bn") < names.index("branch_sum")
    assert [p.name for p in fxreparam.registry.resolve(["dirac", "avgpool"])] == ["fold_constants", "pool_as_conv"]
    assert [p.name for p in fxreparam.registry.resolve("linear_bn")] == ["conv_bn", "bn_conv"]
    assert all(p.description for p in passes)
    with pytest.raises(ValueError, match="already registered"):
        fxreparam.register_pass("conv_bn", "again")(lambda ctx: 0)
    with pytest.raises(KeyError, match="registered"):
        fxreparam.optimize(conv_bn_relu().eval(), skip=["no_such_pass"])


def test_skip_and_passes_select_what_runs():
    model = randomize_batch_norms(conv_bn_relu()).eval()
    x = torch.randn(1, 3, 8, 8)
    assert fxreparam.report(fxreparam.optimize(model, x, skip=["conv_bn"])).after.batch_norm == 1
    rep = fxreparam.report(fxreparam.optimize(model, x, passes=["conv_bn"]))
    assert [p.name for p in rep.passes] == ["conv_bn"] and rep.after.batch_norm == 0


def test_report_prints_tables_with_counts_refusals_and_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 3, padding=1))
    folded = fold(model, torch.randn(2, 3, 8, 8))
    text = str(fxreparam.report(folded))
    for needle in ("pass", "rewrites", "conv_bn", "ops", "before", "after", "batch_norm", "stored elements",
                   "MACs per sample", "refused (", "track_running_stats=False", "verification: ok", "relative error"):
        assert needle in text, needle


def test_result_is_readable_and_keeps_dtype():
    model = randomize_batch_norms(conv_bn_relu()).double().eval()
    folded = fxreparam.optimize(model, torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert all(p.dtype == torch.float64 for p in folded.parameters())
    text = str(folded)
    assert "aten" not in text and "Conv2d(3, 8, kernel_size=(3, 3)" in text
    assert count_kind(folded, nn.BatchNorm2d) == 0


def test_optimizing_twice_changes_nothing():
    model = randomize_batch_norms(nn.Sequential(conv_bn_relu(), conv_bn_relu(8, 8))).eval()
    x = torch.randn(1, 3, 8, 8)
    once = fxreparam.optimize(model, x)
    twice = fxreparam.optimize(once, x)
    rep = fxreparam.report(twice)
    assert all(p.rewrites == 0 for p in rep.passes if p.name != "cleanup")
    assert rep.before == rep.after
    assert rel_err(once(x), twice(x)) == 0.0


def test_report_of_a_plain_module_is_an_error():
    with pytest.raises(ValueError, match=r"not returned by fxreparam\.optimize"):
        fxreparam.report(nn.Linear(2, 2))
