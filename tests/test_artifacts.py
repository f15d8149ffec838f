"""Deployment artifacts keep a dynamic batch and check shapes: .pt2 programs, ONNX, AOTInductor; deploy()'s options."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.export import Dim

import fxreparam
from fxreparam import deploy
from fxreparam.capture import ShapeError
from fxreparam.finalize import finalize
from fxreparam.testing import randomize_batch_norms


def pooled() -> nn.Module:
    """Conv, BN, ReLU, global pooling, Linear: a net that runs at any batch and spatial size."""
    return randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))).eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_save_and_load_accept_another_batch_size_and_check_shapes(tmp_path):
    model, x = pooled(), torch.randn(1, 3, 6, 6)
    folded = fxreparam.optimize(model, x)
    path = fxreparam.save(folded, tmp_path / "folded.pt2", x)
    loaded = fxreparam.load(path)
    with torch.no_grad():
        for shape in [(1, 3, 6, 6), (5, 3, 6, 6), (3, 3, 6, 6)]:
            y = torch.randn(shape)
            assert close(loaded(y), model(y)), shape
        with pytest.raises(ShapeError, match=r"dim 1.*only 3"):
            loaded(torch.randn(5, 2, 6, 6))


def test_export_onnx_keeps_a_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime: pip install 'fxreparam[onnx]'")
    model, x = pooled(), torch.randn(2, 3, 6, 6)
    folded = fxreparam.optimize(model, x)
    path = fxreparam.export_onnx(folded, x, tmp_path / "folded.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert not isinstance(session.get_inputs()[0].shape[0], int), "the batch axis should be symbolic"
    y = torch.randn(5, 3, 6, 6)
    (out,) = session.run(None, {session.get_inputs()[0].name: y.numpy()})
    with torch.no_grad():
        assert close(torch.from_numpy(out), model(y))


def test_aot_inductor_without_a_path_writes_a_temp_package_with_a_dynamic_batch(tmp_path, monkeypatch):
    """One AOTInductor build (about a minute): batch 8 example, called at batch 3; wrong channels raise."""
    monkeypatch.chdir(tmp_path)
    model, x = pooled(), torch.randn(8, 3, 6, 6)
    folded = fxreparam.optimize(model, x)
    runner, path = deploy.deploy(folded, "aot_inductor", (x,), {})
    assert list(tmp_path.iterdir()) == [], "nothing may be written into the working directory"
    assert path.exists() and tmp_path not in path.parents
    y = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        assert close(runner(y), model(y)), "another batch size: the right result or an error, never a wrong size"
        with pytest.raises(ShapeError, match=r"dim 1.*only 3"):
            runner(torch.randn(3, 4, 6, 6))
        again = fxreparam.load(path)  # the package, recognized as one, checks shapes from its own metadata
        assert close(again(y), model(y))
        with pytest.raises(ShapeError, match=r"dim 1.*only 3"):
            again(torch.randn(3, 4, 6, 6))


@pytest.mark.parametrize(("backend", "options", "known"), [
    ("aot_inductor", {"pth": "m.pt2"}, r"known: path"),
    ("tensorrt", {"precison": "fp16"}, r"known: precision, shapes, path"),
    ("eager", {"path": "m.pt2"}, r"known: none"),
    ("inductor", {"max_autotun": True}, r"Inductor config options"),
])
def test_unknown_backend_options_are_refused(backend, options, known):
    folded = fxreparam.optimize(pooled(), torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match=r"unknown backend_options .*" + known):
        deploy.deploy(folded, backend, (torch.randn(2, 3, 6, 6),), options)


def test_deploy_names_the_backends_and_refuses_an_unknown_one():
    assert deploy.BACKENDS == (None, "eager", "inductor", "aot_inductor", "tensorrt")
    assert deploy.INNER_COMPILERS == ("inductor", "eager", "tensorrt")
    gm = torch.fx.symbolic_trace(nn.ReLU())
    assert deploy.compile_with("eager", gm, [torch.randn(2)]) is gm
    with pytest.raises(ValueError, match="unknown backend"):
        deploy.deploy(gm, "tvm", None, {})


def test_load_says_what_a_file_is_when_it_is_no_artifact(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(fxreparam.FxReparamError, match=r"cannot read .*a zip archive of neither kind"):
        fxreparam.load(path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(fxreparam.FxReparamError, match="not a zip archive"):
        fxreparam.load(tmp_path / "notes.txt")


def round_trips(folded: nn.Module, x: torch.Tensor, expected: torch.Tensor, tmp_path) -> None:
    """``folded`` survives deepcopy, torch.save/torch.load and a state_dict round trip and still computes ``expected``.
    """
    torch.save(folded, tmp_path / "folded.pt")
    copies = [copy.deepcopy(folded), torch.load(tmp_path / "folded.pt", weights_only=False)]
    again = copy.deepcopy(folded)
    again.load_state_dict(folded.state_dict())
    with torch.no_grad():
        for module in [*copies, again]:
            assert close(module(x), expected)


def test_a_folded_export_capture_deep_copies_pickles_and_loads_its_state_dict(tmp_path):
    model, x = pooled(), torch.randn(3, 3, 6, 6)
    folded = fxreparam.optimize(model, x)
    with torch.no_grad():
        round_trips(folded, x, model(x), tmp_path)
    loaded = torch.load(io.BytesIO(_saved(folded)), weights_only=False)
    with pytest.raises(ShapeError, match=r"dim 1"):  # the input guard survives the round trip
        loaded(torch.randn(2, 2, 6, 6))


def _saved(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("ran_once", [False, True])
def test_a_folded_old_style_spectral_norm_model_copies_after_calls(ran_once, tmp_path):
    model = randomize_batch_norms(nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 6, 6)
    folded = fxreparam.optimize(model, capture="symbolic_trace")
    if ran_once:
        folded(x)  # under autograd: a spectral_norm hook would leave a computed (non-leaf) weight behind
    with torch.no_grad():
        expected = model(x)
    round_trips(folded, x, expected, tmp_path)


def test_export_onnx_writes_one_file_with_the_captured_dynamic_dims(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime: pip install 'fxreparam[onnx]'")
    model, x = pooled(), torch.randn(2, 3, 6, 6)
    captured = fxreparam.capture(model, (x,), dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},))
    path = fxreparam.export_onnx(finalize(captured.gm), x, tmp_path / "folded.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.onnx"]  # weights inside: no .onnx.data
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.randn(3, 3, 9, 7)
    (out,) = session.run(None, {session.get_inputs()[0].name: y.numpy()})
    with torch.no_grad():
        assert close(torch.from_numpy(out), model(y))


def test_export_onnx_refuses_a_model_that_writes_a_buffer_naming_it(tmp_path):
    pytest.importorskip("onnxscript", reason="the ONNX path needs onnxscript: pip install 'fxreparam[onnx]'")

    class Observer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.register_buffer("peak", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            self.peak.copy_(torch.maximum(self.peak, y.abs().amax()))
            return y / (self.peak + 1)

    x = torch.randn(2, 3, 4, 4)
    folded = fxreparam.optimize(Observer().eval(), x, verify=False)
    with pytest.raises(fxreparam.FxReparamError, match=r"buffer.*peak.*cannot carry state"):
        fxreparam.export_onnx(folded, x, tmp_path / "folded.onnx")
