"""Capture: a functional graph, export's guards kept and made clear, a dynamic batch, opaque modules, clear errors."""

from __future__ import annotations

import copy
import importlib
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxreparam
from fxreparam.capture import ShapeError, capture
from fxreparam.errors import CaptureError, FxReparamError
from fxreparam.testing import randomize_batch_norms

OPAQUE = "fxreparam_opaque"


class InPlace(nn.Module):
    """In-place writes everywhere: a Dirac kernel built by writing ones, a channel zeroed, a view added to, a cast."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        dirac = torch.zeros_like(self.conv.weight)
        for k in range(4):
            dirac[k, k, 1, 1] = 1
        y = self.bn(self.conv(x)) + F.conv2d(x, dirac, padding=1)
        y.narrow(1, 0, 1).zero_()
        y.view(-1).add_(1)
        return torch.relu_(y).float().to(x.device)


class Head(nn.Module):
    """A conv net whose head flattens with ``view(x.size(0), -1)`` into a Linear: pins the channels and H * W."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(y.view(y.size(0), -1))


class Pooled(nn.Module):
    """Conv, BN, global pooling and a Linear: every size but the channels may vary."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


def model(cls: type[nn.Module]) -> nn.Module:
    return randomize_batch_norms(cls()).eval()


def call_functions(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"]


# ----------------------------------------------------------------------------------------------- functional graph


def test_export_capture_is_functional_and_has_no_metadata_asserts():
    m, x = model(InPlace), torch.randn(2, 4, 6, 6)
    captured = capture(m, (x,), method="export")
    ops = [n.target for n in call_functions(captured.gm) if isinstance(n.target, torch._ops.OpOverload)]
    mutable = [str(t) for t in ops if t._schema.is_mutable]
    assert not mutable, f"in-place ops left in the captured graph: {mutable}"
    assert not any("_assert_tensor_metadata" in str(t) for t in ops)
    assert any("scatter" in str(t) for t in ops), "the in-place writes should be explicit scatter data flow"
    with torch.no_grad():
        assert torch.allclose(captured.gm(x), m(x), atol=1e-6)
        # a float64 copy runs (no dtype assertion left behind by .float(), a no-op at capture) and stays float64
        ref = copy.deepcopy(m).double()(x.double())  # float32: the eager .float() rounds it
        out = copy.deepcopy(captured.gm).double()(x.double())
    assert out.dtype == torch.float64 and torch.allclose(out.float(), ref, atol=1e-6)


# ----------------------------------------------------------------------------------------------- shapes and guards


def test_batch_one_example_captures_a_dynamic_batch():
    m, x = model(Pooled), torch.randn(1, 4, 6, 6)
    captured = capture(m, (x,), method="export")
    assert captured.example_shapes == [(1, 4, 6, 6)]
    assert set(captured.dynamic_dims[0]) == {0}  # the batch; spatial sizes stay guarded (capture.DYNAMIC_DIMS)
    assert captured.input_names == ["x"]
    with torch.no_grad():
        for shape in [(1, 4, 6, 6), (4, 4, 6, 6), (3, 4, 6, 6)]:
            x = torch.randn(shape)
            assert torch.allclose(captured.gm(x), m(x), atol=1e-5), shape
    with pytest.raises(ShapeError, match="dim 2"):
        captured.gm(torch.randn(3, 4, 9, 7))


def test_batch_one_example_of_a_batch_sensitive_model_stays_batch_one_with_a_guard():
    class Squeezed(Pooled):
        def forward(self, x):
            y = super().forward(x)
            return y[0] if x.shape[0] == 1 else y  # [3] at batch 1, [N, 3] otherwise

    m, x = model(Squeezed), torch.randn(1, 4, 6, 6)
    captured = capture(m, (x,), method="export")
    assert 0 not in captured.dynamic_dims[0]
    with torch.no_grad():
        assert captured.gm(x).shape == m(x).shape == (3,)
        with pytest.raises(ShapeError, match=r"'x'.*dim 0.*only 1"):
            captured.gm(torch.randn(4, 4, 6, 6))


def test_a_batch_of_two_capture_that_misses_the_example_is_captured_again_as_given(monkeypatch):
    """Capture no longer runs the model to check the batch-of-two graph: the verification does, and a graph that
    does not compute the model at batch 1 is captured again at batch 1 (here export sees another model at 2)."""
    capture_module = importlib.import_module("fxreparam.capture.export")  # where the export attempts live
    m, x = model(Pooled), torch.randn(1, 4, 6, 6)
    export = capture_module._export_program

    def other_model_at_two(module, args, kwargs, dims):
        if args[0].shape[0] == 2:
            wrong = copy.deepcopy(module)
            wrong.conv.weight.data.mul_(-1)
            return export(wrong, args, kwargs, dims)
        return export(module, args, kwargs, dims)

    monkeypatch.setattr(capture_module, "_export_program", other_model_at_two)
    folded = fxreparam.optimize(m, x)
    assert fxreparam.report(folded).verification.ok
    assert not any("batch of 2" in note for note in capture(m, (x,), method="export", double=False).notes)
    with torch.no_grad():
        assert torch.allclose(folded(x), m(x), atol=1e-5)


def test_a_capture_that_computes_something_else_is_blamed_on_the_capture():
    class FirstCallDiffers(Pooled):
        """Traced once (export) with a weight sign flipped: the graph is not the model that runs afterwards."""

        def forward(self, x):
            self.calls = getattr(self, "calls", 0) + 1
            return super().forward(-x if self.calls == 1 else x)

    m = model(FirstCallDiffers)
    with pytest.raises(fxreparam.VerificationError, match=r"captured graph .* computes something other than") as err:
        fxreparam.optimize(m, torch.randn(1, 4, 6, 6), capture="export")
    assert err.value.pass_name == "capture"


def test_pinned_dims_keep_their_guard_and_a_wrong_shape_names_input_dim_and_size():
    m = model(Head)
    captured = capture(m, (torch.randn(2, 4, 5, 5),), method="export")
    assert 0 in captured.dynamic_dims[0] and 1 not in captured.dynamic_dims[0]
    assert any(n.op == "call_module" and n.target == "_guards_fn" for n in captured.gm.graph.nodes)
    with torch.no_grad():
        assert captured.gm(torch.randn(7, 4, 5, 5)).shape == (7, 3)
        with pytest.raises(ShapeError, match=r"'x'.*dim 1.*only 4"):
            captured.gm(torch.randn(2, 3, 5, 5))
        with pytest.raises(ShapeError, match=r"'x' has size 6 at dim 3.*captured with 'x' of shape"):
            captured.gm(torch.randn(2, 4, 5, 6))  # spatial sizes are pinned (and the Linear needs H * W = 25)
        with pytest.raises(ShapeError, match=r"'x' has 3 dims"):
            captured.gm(torch.randn(2, 4, 5))
    assert issubclass(ShapeError, FxReparamError) and issubclass(ShapeError, ValueError)


def test_export_guards_between_inputs_are_kept_and_clear():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    m = Two().eval()
    captured = capture(m, (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)), method="export")
    with torch.no_grad():
        assert captured.gm(torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)).shape == (3, 4, 4, 4)
        with pytest.raises(ShapeError, match=r"size\(\)\[0\]"):  # export's guard: the batches must agree
            captured.gm(torch.randn(3, 3, 4, 4), torch.randn(2, 3, 4, 4))


def test_folded_model_checks_its_inputs_before_any_layer_runs():
    m, x = model(Pooled), torch.randn(1, 4, 6, 6)
    folded = fxreparam.optimize(m, x)
    with torch.no_grad():
        y = torch.randn(5, 4, 6, 6)
        assert torch.allclose(folded(y), m(y), atol=1e-5)
        with pytest.raises(ShapeError, match=r"'x'.*dim 1.*only 4.*captured with 'x' of shape \[1, 4, 6, 6\]"):
            folded(torch.randn(5, 3, 6, 6))


# ----------------------------------------------------------------------------------------------- symbolic_trace


def opaque_nodes(gm: torch.fx.GraphModule) -> dict[str, str]:
    return {str(n.target): n.meta[OPAQUE] for n in gm.graph.nodes if OPAQUE in n.meta}


def test_symbolic_trace_keeps_hooked_modules_opaque_and_runs_their_hooks():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())).eval()
    m[0].register_forward_hook(lambda mod, args, out: out * 2)
    m[2].register_forward_pre_hook(lambda mod, args: (args[0] - 1,))
    gm = capture(m, None).gm
    assert opaque_nodes(gm) == {"0": "has forward hooks", "2": "has forward pre-hooks"}
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(gm(x), m(x))


def test_symbolic_trace_keeps_qat_conv_and_weight_norm_opaque():
    qat = pytest.importorskip("torch.ao.nn.qat")
    qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.utils.weight_norm is deprecated in favour of the parametrization
        old_style = nn.utils.weight_norm(nn.Conv2d(4, 4, 3))
    m = nn.Sequential(qat.Conv2d(3, 4, 3, qconfig=qconfig), nn.BatchNorm2d(4), old_style, nn.Conv2d(4, 4, 1)).eval()
    reasons = opaque_nodes(capture(m, None).gm)
    assert reasons["0"] == "overrides forward (torch.ao.nn.qat.modules.conv.Conv2d)"
    assert reasons["2"] == "has forward pre-hooks"
    assert set(reasons) == {"0", "2"}  # plain layers stay recognizable


def test_symbolic_trace_traces_through_user_subclasses_of_layers():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Sequential(Doubled(3, 4, 3), nn.BatchNorm2d(4)).eval()
    gm = capture(m, None).gm
    assert not opaque_nodes(gm)
    assert any(n.op == "call_function" and "conv2d" in str(n.target) for n in gm.graph.nodes)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(gm(x), m(x))


def test_root_hooks_refuse_symbolic_trace_with_a_remedy_and_export_runs_them():
    m = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    m.register_forward_hook(lambda mod, args, out: out + 1)
    with pytest.raises(CaptureError, match=r"forward hooks.*pass example inputs"):
        capture(m, None)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.allclose(capture(m, (x,)).gm(x), m(x))


# ----------------------------------------------------------------------------------------------- errors


SYMBOL = re.compile(r"\b[su]\d+\b")


def test_inputs_that_do_not_fit_name_the_expected_shape():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    with pytest.raises(CaptureError, match=r"\[N, 3, H, W\]") as info:
        capture(m, (torch.randn(2, 4, 8, 8),))
    assert "[2, 4, 8, 8]" in str(info.value) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(("example", "remedy"), [
    (lambda: (torch.randn(2, 3).numpy(),), r"torch\.from_numpy"),
    (lambda: ([[0.5, 1.0, 2.0]],), r"hold no tensor.*torch\.tensor"),
])
def test_unsupported_input_types_say_what_to_pass(example, remedy):
    with pytest.raises(CaptureError, match=remedy):
        capture(nn.Linear(3, 2).eval(), example())


def test_meta_device_weights_are_refused():
    with torch.device("meta"):
        m = nn.Linear(3, 2)
    with pytest.raises(CaptureError, match=r"meta device.*load real weights"):
        capture(m, (torch.randn(2, 3),))


def test_data_dependent_control_flow_is_named_with_the_line_and_no_symbols():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return x

    with pytest.raises(CaptureError) as info:
        capture(Branchy().eval(), (torch.randn(2, 3, 4, 4),))
    text = str(info.value)
    assert "branches on a tensor's value" in text and "test_capture.py" in text and "x.sum() > 0" in text
    assert not SYMBOL.search(text), text
