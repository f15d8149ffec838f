"""Compilers and deployment: the torch.compile backend, optimize(backend=...), .pt2 files, ONNX, TensorRT."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import rel_err
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms


def repvgg_like() -> nn.Module:
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
            self.b = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
            self.c = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x) + self.c(x))

    return randomize_batch_norms(nn.Sequential(Block(), Block())).eval()


BACKEND_SCRIPT = textwrap.dedent("""
    import torch, torch.nn as nn
    torch.manual_seed(0)

    class DataDependent(nn.Module):  # neither export nor symbolic_trace takes it whole
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
            self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

        def forward(self, x):
            y = self.a(x) + self.b(self.a(x))
            return self.b(y) if y.sum() > 0 else -y

    model = DataDependent().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(); m.running_var.uniform_(0.5, 1.5)
    compiled = torch.compile(model, backend="fxreparam", options={"inner": "eager"})
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        err = max((compiled(s * x) - model(s * x)).abs().max().item() for s in (1, -1))
    import fxreparam
    reports = fxreparam.region_reports()
    print("ERR", err, "REGIONS", len(reports), "BN_LEFT", sum(r.after.batch_norm for r in reports),
          "BN_BEFORE", sum(r.before.batch_norm for r in reports))
""")


def test_torch_compile_backend_is_registered_and_folds_region_by_region():
    # A fresh interpreter that never imports fxreparam before torch.compile: the entry point finds it.
    out = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT], capture_output=True, text=True, timeout=600,
                         check=True).stdout
    fields = out.split()
    values = dict(zip(fields[::2], fields[1::2]))
    assert float(values["ERR"]) < 1e-5
    assert int(values["REGIONS"]) >= 2 and int(values["BN_BEFORE"]) > 0 and int(values["BN_LEFT"]) == 0


def test_backend_rejects_unknown_options():
    model = repvgg_like()
    compiled = torch.compile(model, backend=fxreparam.fxreparam_backend, options={"inner": "nope"})
    with pytest.raises(Exception, match="unknown inner compiler"):
        compiled(torch.randn(1, 4, 6, 6))


def test_backend_with_inductor():
    torch._dynamo.reset()
    model = repvgg_like()
    compiled = torch.compile(model, backend="fxreparam")
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert rel_err(model(x), compiled(x)) < 1e-5
    assert fxreparam.region_reports()[-1].after.batch_norm == 0


def test_weights_dynamo_installs_on_the_graph_are_verified_in_float64_too():
    """With Inductor's freezing on while tracing, Dynamo puts the weights on the graph instead of passing them as
    inputs: the region's float64 reference must convert them too, else it does not run, the allowed error falls to
    the float32 floor, and an exact fold of an ill-conditioned region (timm mobileone_s0) is rejected."""
    from fxreparam.backends import _float64_caller, region
    from fxreparam.verify import Reference

    torch._dynamo.reset()
    seen = []

    def spy(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm

    model, x = repvgg_like(), torch.randn(2, 4, 6, 6)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        torch.compile(model, backend=spy)(x)
    gm, inputs = seen[0]
    assert any(n.op == "get_attr" for n in gm.graph.nodes)  # the weights are on the graph
    prepared = region(gm, inputs)
    reference = Reference(prepared.caller(gm, range(len(inputs))), tuple(inputs[i] for i in prepared.varying),
                          original64=_float64_caller(gm, prepared))
    assert reference.outputs64[0][0].dtype == torch.float64
    assert reference.calibrated and not any("float64" in n for n in reference.notes), reference.notes
    options = {"inner": "eager"}  # and the README's recipe: the module frozen for Dynamo too
    if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        torch._dynamo.reset()
        out = torch.compile(model, backend="fxreparam", options=options)(x)
    report = fxreparam.region_reports()[-1]
    assert report.after.batch_norm == 0 and report.verification.ok and rel_err(model(x), out) < 1e-5


def test_a_region_with_many_frozen_weights_points_at_the_guard_filter():
    torch._dynamo.reset()
    many = nn.Sequential(*[nn.Conv2d(4, 4, 1) for _ in range(40)]).eval()  # 80 parameters
    with torch.no_grad():
        torch.compile(many, backend="fxreparam", options={"inner": "eager"})(torch.randn(1, 4, 6, 6))
    assert any("80 parameters and buffers frozen" in n and "guard_filter_fn" in n
               for n in fxreparam.region_reports()[-1].notes)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(repvgg_like(), backend="fxreparam", options={"inner": "eager"})(torch.randn(1, 4, 6, 6))
    assert not any("guard_filter_fn" in n for n in fxreparam.region_reports()[-1].notes)


def test_optimize_with_inductor_backend():
    model = repvgg_like()
    x = torch.randn(2, 4, 6, 6)
    compiled = fxreparam.optimize(model, x, backend="inductor")
    with torch.no_grad():
        assert rel_err(model(x), compiled(x)) < 1e-5
    assert fxreparam.report(compiled).after.conv == 2


def test_optimize_with_inductor_freezes_the_weights_whatever_the_config_while_dynamo_traces(monkeypatch):
    """Inductor's freezing passes see only the weights on the graph, and Dynamo keeps them there only with
    ``freezing`` on while it traces: ``options={"freezing": True}`` alone compiled them as inputs. Inductor now
    gets a graph whose only input is ``x``; with autograd on, the weights stay inputs and get gradients."""
    import fxreparam.frozen

    compiled_inputs = []
    compile_frozen = fxreparam.frozen.compile_frozen

    def spy(gm, example_inputs, config=None):
        compiled_inputs.append(len([n for n in gm.graph.nodes if n.op == "placeholder"]))
        return compile_frozen(gm, example_inputs, config)

    monkeypatch.setattr(fxreparam.frozen, "compile_frozen", spy)
    model = repvgg_like()
    x = torch.randn(2, 4, 6, 6)
    compiled = fxreparam.optimize(model, x, backend="inductor")
    with torch.no_grad():
        assert rel_err(model(x), compiled(x)) < 1e-5
        assert rel_err(model(torch.cat([x, x, x])), compiled(torch.cat([x, x, x]))) < 1e-5  # compiled again
    assert compiled_inputs[0] == 1 and len(compiled_inputs) == 2  # x only (then x and its symbolic batch size)
    compiled(x).sum().backward()  # autograd on: compiled as it is, gradients reach the folded weights
    assert all(p.grad is not None for p in compiled._orig_mod.parameters())
    unfrozen = fxreparam.optimize(model, x, backend="inductor", backend_options={"freezing": False})
    with torch.no_grad():
        before = unfrozen(x)
        next(unfrozen._orig_mod.parameters()).mul_(2.0)
        assert not torch.equal(unfrozen(x), before)  # the weights are inputs: a change is seen


def test_save_and_load_in_a_fresh_process(tmp_path):
    model = repvgg_like()
    x = torch.randn(2, 4, 6, 6)
    folded = fxreparam.optimize(model, x)
    path = fxreparam.save(folded, tmp_path / "folded.pt2", x)
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        program = torch.export.load({str(path)!r}).module()
        y = program(io["x"])
        print((torch.linalg.vector_norm(y - io["y"]) / torch.linalg.vector_norm(io["y"])).item())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    assert float(out.stdout.strip()) < 1e-5
    assert rel_err(model(x), fxreparam.load(path)(x)) < 1e-5


def test_export_onnx_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime: pip install 'fxreparam[onnx]'")
    model = repvgg_like()
    x = torch.randn(2, 4, 6, 6)
    folded = fxreparam.optimize(model, x)
    path = fxreparam.export_onnx(folded, x, tmp_path / "folded.onnx")
    import onnx

    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "Conv" for n in graph.node) == 2
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert rel_err(model(x), torch.from_numpy(y)) < 1e-5


def test_tensorrt_backend(tmp_path):
    pytest.importorskip("torch_tensorrt", reason="TensorRT and torch-tensorrt are not installed (optional extra "
                                                 "fxreparam[tensorrt], needs an NVIDIA GPU)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    model = repvgg_like().cuda()
    x = torch.randn(2, 4, 6, 6, device="cuda")
    engine = fxreparam.optimize(model, x, backend="tensorrt", backend_options={"path": tmp_path / "trt.ep"})
    assert rel_err(model(x), engine(x)) < 1e-3


def test_tensorrt_without_the_extra_says_what_to_install():
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(fxreparam.FxReparamError, match=r"fxreparam\[tensorrt\]"):
            fxreparam.optimize(repvgg_like(), torch.randn(1, 4, 6, 6), backend="tensorrt")
    else:
        pytest.skip("torch_tensorrt is installed here; the missing-extra message cannot be shown")


def test_aot_inductor_package(tmp_path):
    model = repvgg_like()
    x = torch.randn(2, 4, 6, 6)
    runner, path = fxreparam.optimize(model, x, backend="aot_inductor",
                                      backend_options={"path": str(tmp_path / "folded.pt2")})
    assert path.exists()
    assert rel_err(model(x), runner(x)) < 1e-5


def test_a_region_failing_verification_compiles_without_the_culprit_and_warns():
    @fxreparam.register_pass("scale_region_output", "a deliberately wrong rewrite, for this test", after="conv_bn")
    def scale_region_output(ctx):
        if getattr(ctx.gm, "_scaled_by_test", False):
            return 0
        output = next(n for n in ctx.graph.nodes if n.op == "output")
        first = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
        with ctx.graph.inserting_before(output):
            scaled = ctx.graph.call_function(torch.mul, (first, 1.5))
        output.replace_input_with(first, scaled)
        ctx.gm._scaled_by_test = True
        return 1

    try:
        torch._dynamo.reset()
        model = repvgg_like()
        x = torch.randn(2, 4, 6, 6)
        compiled = torch.compile(model, backend="fxreparam", options={"inner": "eager"})
        with pytest.warns(UserWarning, match="scale_region_output"), torch.no_grad():
            y = compiled(x)
        with torch.no_grad():
            assert rel_err(model(x), y) < 1e-5
        region = fxreparam.region_reports()[-1]
        assert "scale_region_output" not in region.rewrites and region.after.batch_norm == 0
        assert region.verification.ok and any("scale_region_output" in n for n in region.notes)
        assert "scale_region_output" in str(region)
        assert region.optimize_seconds > 0 and region.capture_seconds > 0
    finally:
        fxreparam.unregister_pass("scale_region_output")
        torch._dynamo.reset()


class _InPlaceBlocks(nn.Module):
    """RepVGG-style blocks written the way Dynamo keeps them: ``out += ...`` and in-place activations."""

    def __init__(self, c: int = 4, blocks: int = 2):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(blocks))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(blocks))
        self.ids = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(blocks))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        for conv, bn, identity in zip(self.convs, self.bns, self.ids):
            out = bn(conv(x))
            out += identity(x)
            x = self.act(out)
        return x


def test_backend_folds_regions_with_in_place_writes_completely():
    torch._dynamo.reset()
    model = randomize_batch_norms(_InPlaceBlocks()).eval()
    compiled = torch.compile(model, backend="fxreparam", options={"inner": "eager"})
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert rel_err(model(x), compiled(x)) < 1e-5
    after = fxreparam.region_reports()[-1].after
    assert (after.conv, after.batch_norm, after.add_sub) == (2, 0, 0)


def test_backend_compiles_a_real_model_with_inductor():
    """timm's MobileOne: its folded region once crashed Inductor's conv-BN passes (modules beside functional BNs)."""
    timm = pytest.importorskip("timm")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model("mobileone_s0", pretrained=False)).eval()
    compiled = torch.compile(model, backend="fxreparam")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), compiled(x)) < 1e-5
    report = fxreparam.region_reports()[-1]
    assert report.after.batch_norm == 0 and report.after.conv == 43 and "compiled unfolded" not in str(report)


def _compiled_counts(model, inputs, **compile_options):
    """Compile ``model`` with the backend (eager inner), run it on each input; outputs match, and the op counts
    (convs, batch norms) of each region compiled on the way."""
    torch._dynamo.reset()
    start = len(fxreparam.region_reports())
    compiled = torch.compile(model, backend="fxreparam", options={"inner": "eager"}, **compile_options)
    with torch.no_grad():
        for x in inputs:
            assert rel_err(model(x), compiled(x)) < 1e-5
    return [(r.after.conv, r.after.batch_norm) for r in fxreparam.region_reports()[start:]]


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return randomize_batch_norms(torchvision.models.resnet18(num_classes=10)).eval()


@pytest.mark.parametrize("build, channels, convs", [
    (lambda: randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())).eval(),
     3, 1),
    (repvgg_like, 4, 2),
    (_resnet18, 3, 20),
])
def test_dynamic_true_folds_as_a_static_compile_and_is_verified_at_two_sizes(build, channels, convs):
    """Dynamo lifts a BatchNorm's eps and momentum to inputs and passes symbolic sizes (conv_bn crashed on them)."""
    model = build()
    static = _compiled_counts(model, [torch.randn(2, channels, 32, 32)])
    dynamic = _compiled_counts(model, [torch.randn(2, channels, 32, 32), torch.randn(3, channels, 32, 32)],
                               dynamic=True)
    assert static == dynamic == [(convs, 0)]
    region = fxreparam.region_reports()[-1]
    assert region.verification.ok and region.verification.shapes == 2
    assert any("symbolic" in n for n in region.notes) and any("scalars" in n for n in region.notes)


def test_a_recompile_after_a_batch_size_change_folds_as_the_first_compile():
    counts = _compiled_counts(_resnet18(), [torch.randn(1, 3, 32, 32), torch.randn(4, 3, 32, 32)])
    assert len(counts) == 2 and counts[0] == counts[1] == (20, 0)


def test_mark_dynamic_folds_and_a_graph_break_folds_each_region():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = repvgg_like(), repvgg_like()

        def forward(self, x):
            y = self.a(x)
            torch._dynamo.graph_break()
            return self.b(y)

    x = torch.randn(3, 4, 8, 8)
    torch._dynamo.mark_dynamic(x, 0)
    counts = _compiled_counts(Broken().eval(), [x])
    assert counts == [(2, 0), (2, 0)]


def test_a_lifted_scalar_changed_after_the_compile_runs_the_region_unfolded():
    """Dynamo does not guard a BatchNorm's eps under dynamic=True: the folded region checks it at every call."""
    torch._dynamo.reset()
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))).eval()
    compiled = torch.compile(model, backend="fxreparam", options={"inner": "eager"}, dynamic=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        compiled(x)
        model[1].eps = 0.5
        assert rel_err(model(x), compiled(x)) < 1e-6


def test_the_backend_takes_optimizes_options():
    model = repvgg_like()
    assert _compiled_counts(model, [torch.randn(2, 4, 6, 6)]) == [(2, 0)]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxreparam", options={"inner": "eager", "skip": ["conv_bn", "branch_sum"],
                                                                  "tolerance": 1e-3, "verify": True})
    with torch.no_grad():
        assert rel_err(model(torch.randn(2, 4, 6, 6)), compiled(torch.randn(2, 4, 6, 6))) < 10  # it runs
    region = fxreparam.region_reports()[-1]
    assert "conv_bn" not in region.rewrites and region.after.batch_norm > 0
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no pass named"):
        torch.compile(model, backend="fxreparam", options={"skip": ["nope"]})(torch.randn(1, 4, 6, 6))


def test_a_pass_crash_compiles_the_region_unfolded_with_one_warning_naming_the_remedy():
    @fxreparam.register_pass("crash_for_test", "a pass that crashes, for this test", after="conv_bn")
    def crash_for_test(ctx):
        raise RuntimeError("boom")

    try:
        torch._dynamo.reset()
        model = repvgg_like()
        compiled = torch.compile(model, backend="fxreparam", options={"inner": "eager"})
        x = torch.randn(2, 4, 6, 6)
        with pytest.warns(UserWarning) as caught, torch.no_grad():
            y = compiled(x)
        ours = [str(w.message) for w in caught if "fxreparam" in str(w.message)]
        assert len(ours) == 1 and "crash_for_test" in ours[0] and "options={'skip': ['crash_for_test']}" in ours[0]
        with torch.no_grad():
            assert rel_err(model(x), y) < 1e-6
        assert "compiled unfolded" in str(fxreparam.region_reports()[-1])
    finally:
        fxreparam.unregister_pass("crash_for_test")
        torch._dynamo.reset()
