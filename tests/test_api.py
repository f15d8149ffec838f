"""Bad calls to ``optimize`` get a clear error before any work; selections by one name; progress on request."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms


def conv_bn() -> nn.Module:
    return randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))).eval()


@pytest.mark.parametrize("bad", [None, lambda x: x, torch.relu], ids=["None", "lambda", "function"])
def test_not_a_module_is_a_type_error_naming_nn_module(bad):
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fxreparam.optimize(bad, torch.randn(1, 3, 6, 6))


@pytest.mark.parametrize("example", ["cpu", "none"])
def test_weights_on_the_meta_device_say_to_load_real_weights(example):
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 6, 6) if example == "cpu" else None
    with pytest.raises(ValueError, match="meta device: load real weights first"):
        fxreparam.optimize(model, x)


def test_example_on_the_meta_device_is_a_value_error():
    with pytest.raises(ValueError, match="meta device"):
        fxreparam.optimize(conv_bn(), torch.randn(1, 3, 6, 6, device="meta"))


def test_passes_and_skip_take_a_single_name():
    model, x = conv_bn(), torch.randn(1, 3, 6, 6)
    skipped = fxreparam.report(fxreparam.optimize(model, x, skip="conv_bn"))
    assert skipped.after.batch_norm == 1 and "conv_bn" not in [p.name for p in skipped.passes]
    only = fxreparam.report(fxreparam.optimize(model, x, passes="conv_bn"))
    assert [p.name for p in only.passes] == ["conv_bn"] and only.after.batch_norm == 0


@pytest.mark.parametrize("where", ["skip", "passes"])
def test_unknown_pass_names_raise_key_error_listing_the_known(where):
    with pytest.raises(KeyError, match="conv_bn"):
        fxreparam.optimize(conv_bn(), torch.randn(1, 3, 6, 6), **{where: ["no_such_pass"]})


def test_unknown_backend_and_backend_option_are_value_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="bogus"):
        fxreparam.optimize(conv_bn(), torch.randn(1, 3, 6, 6), backend_options={"bogus": 1})
    with pytest.raises(ValueError, match="unknown backend"):
        fxreparam.optimize(conv_bn(), torch.randn(1, 3, 6, 6), backend="onnx")
    assert os.listdir(tmp_path) == []


def test_nothing_to_compare_raises_and_leaves_the_model_alone():
    class Empty(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = conv_bn()

        def forward(self, x):
            return self.block(x)[:, :0]

    model = Empty().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxreparam.VerificationError, match="could not verify") as info:
        fxreparam.optimize(model, torch.randn(2, 3, 6, 6))  # every output is empty: never "ok"
    assert info.value.pass_name is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_progress_logs_each_step_with_its_time(capsys):
    level = logging.getLogger("fxreparam").level
    fxreparam.optimize(conv_bn(), torch.randn(2, 3, 6, 6), progress=True)
    err = capsys.readouterr().err
    for step in ("capturing", "captured", "passes", "verified"):
        assert f"fxreparam: {step}" in err or step in err, step
    assert " s" in err and logging.getLogger("fxreparam").level == level
    assert "fxreparam: passes, round 1" in err and "pass" in err  # tqdm's bar over the passes of each round
    fxreparam.optimize(conv_bn(), torch.randn(2, 3, 6, 6))
    assert "fxreparam:" not in capsys.readouterr().err


def test_optimize_documents_its_arguments():
    doc = fxreparam.optimize.__doc__
    for section in ("Args:", "Returns:", "Raises:", "progress:", "backend_options:", "tolerance:"):
        assert section in doc


def test_without_example_inputs_the_report_says_what_inputs_would_add():
    class Block(nn.Module):  # a RepVGG-style block with an identity BN after an in-place activation
        def __init__(self):
            super().__init__()
            self.act, self.conv, self.bn, self.id_bn = nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1), \
                nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.act(x)
            return self.bn(self.conv(x)) + self.id_bn(x)

    text = str(fxreparam.report(fxreparam.optimize(Block().eval())))
    assert "no example inputs" in text and "optimize(model, example_inputs) folds more" in text
    assert "verification: skipped" in text


@pytest.mark.parametrize("capture", ["auto", "symbolic_trace"])
def test_a_float64_example_for_a_float32_model_is_a_clear_error_before_any_work(capture, monkeypatch):
    import fxreparam.api

    def no_capture(*args, **kwargs):
        raise AssertionError("captured: the dtype was not checked first")

    monkeypatch.setattr(fxreparam.api, "capture_graph", no_capture)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()  # export takes it; the run does not
    with pytest.raises(fxreparam.CaptureInputError, match=r"torch\.float64.*Remedy.*x\.to\(torch\.float32\)"):
        fxreparam.optimize(model, torch.randn(2, 4, dtype=torch.float64), capture=capture)


def test_an_example_in_another_dtype_the_model_casts_is_accepted():
    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = conv_bn()

        def forward(self, x):
            return self.body(x.float())

    folded = fxreparam.optimize(Casting().eval(), torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert fxreparam.report(folded).after.batch_norm == 0


def test_dynamic_shapes_reach_the_capture(monkeypatch):
    import fxreparam.api

    seen = {}
    real = fxreparam.api.capture_graph

    def spy(*args, **kwargs):
        seen.update(kwargs)
        kwargs.pop("dynamic_shapes", None)
        return real(*args, **kwargs)

    monkeypatch.setattr(fxreparam.api, "capture_graph", spy)
    fxreparam.optimize(conv_bn(), torch.randn(2, 3, 6, 6))
    assert "dynamic_shapes" not in seen  # not passed where not given
    shapes = ({0: torch.export.Dim("batch")},)
    fxreparam.optimize(conv_bn(), torch.randn(2, 3, 6, 6), dynamic_shapes=shapes)
    assert seen["dynamic_shapes"] is shapes


def test_the_registry_does_not_import_the_pipeline():
    """The pass order lives in the registry; the pipeline imports it (they imported each other)."""
    import ast
    import inspect

    import fxreparam.registry

    tree = ast.parse(inspect.getsource(fxreparam.registry))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "pipeline" not in imported and fxreparam.pipeline.ordered is fxreparam.registry.ordered
