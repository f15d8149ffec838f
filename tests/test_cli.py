"""The command line: optimize and bench a model from a file, one-line errors, help text, several inputs, dtype and
device, a report for every backend, and the benchmark script.

Most tests call ``fxreparam.cli.main`` in this process (a subprocess pays several seconds of imports on this
machine); the first two run the installed module as a subprocess, end to end.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import fxreparam
import fxreparam.cli
from fxreparam import deploy
from fxreparam.cli import main
from fxreparam.timing import Spread, interleaved_times

ROOT = Path(__file__).resolve().parents[1]
SYMBOLIC = re.compile(r"\b[su]\d+\b")  # torch's symbolic sizes (s77) must never reach a user


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxreparam.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``fxreparam ARGS`` in this process: exit code, stdout, stderr."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _model_file(tmp_path: Path) -> Path:
    path = tmp_path / "mymodel.py"
    path.write_text(textwrap.dedent("""
        import torch
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

        class TwoInputs(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3, padding=1)
                self.bn = nn.BatchNorm2d(4)
                self.embed = nn.Embedding(5, 4)

            def forward(self, x, tokens):
                return self.bn(self.conv(x)).mean((2, 3)) + self.embed(tokens).sum(1)

        def two():
            return TwoInputs()

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)

            def forward(self, x):
                if x.sum() > 0:
                    return self.conv(x)
                return -self.conv(x)

        def branchy():
            return Branchy()
    """))
    return path


def _one_error_line(err: str) -> str:
    """The stderr of a failed command, which must be exactly one line (run with --quiet): that line."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(r"fxreparam( \w+)?: error: ", lines[0]), lines[0]
    assert not SYMBOLIC.search(lines[0]), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------- end to end


def test_optimize_a_file_model_with_weights_and_save_it(tmp_path):
    path = _model_file(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        import mymodel
    finally:
        sys.path.pop(0)
    model = mymodel.build()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    out = run("optimize", f"{path}:build", "--input", "1x3x16x16", "--weights", str(tmp_path / "weights.pt"),
              "--out", str(tmp_path / "folded.pt2"))
    assert out.returncode == 0, out.stderr
    assert "verification: ok" in out.stdout and "saved:" in out.stdout and "torch.export program" in out.stdout
    assert "capturing" in out.stderr  # progress goes to stderr
    loaded = torch.export.load(str(tmp_path / "folded.pt2")).module()
    x = torch.randn(1, 3, 16, 16)
    model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert deploy._kind(tmp_path / "folded.pt2") == "program"


def test_a_failure_is_one_line_in_a_real_process(tmp_path):
    """A real process: no traceback, one line naming the problem, exit code 2 for a wrong argument."""
    path = _model_file(tmp_path)
    out = run("optimize", f"{path}:build", "--input", "1x3x16x16", "--weights", str(tmp_path / "missing.pt"),
              "--quiet")
    assert out.returncode == 2
    assert "--weights" in _one_error_line(out.stderr) and "no such file" in out.stderr


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = cli(capsys, "optimize", f"{_model_file(tmp_path)}:build", "--input", "1x3x16x16", "--weights",
                       str(tmp_path / "missing.pt"), "--quiet", "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("fxreparam: error: --weights")


# ----------------------------------------------------------------------------------------------- errors


def _other_weights(tmp_path: Path) -> Path:
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3)).state_dict(), path)
    return path


def _pickled_model(tmp_path: Path) -> Path:
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), path)
    return path


ERRORS = [  # (id, arguments after MODEL as a function of tmp_path, exit code, phrases the line must hold)
    ("wrong channels", lambda p: ["--input", "1x4x16x16"], 2, ["4 channels", "[N, 3, H, W]", "--input"]),
    ("wrong rank", lambda p: ["--input", "16x16"], 2, ["[16, 16]", "[N, 3, H, W]", "--input"]),
    ("int64 input", lambda p: ["--input", "1x3x16x16:int64"], 2, ["torch.int64", "--input"]),
    ("too many inputs", lambda p: ["--input", "1x3x16x16", "--input", "1x10"], 2,
     ["takes 1 positional input", "one --input per input"]),
    ("missing weights", lambda p: ["--input", "1x3x16x16", "--weights", str(p / "nope.pt")], 2, ["no such file"]),
    ("weights of another model", lambda p: ["--input", "1x3x16x16", "--weights", str(_other_weights(p))], 2,
     ["does not fit", "'0.weight': [5, 3, 3, 3] in the file, [8, 3, 3, 3] in the model", "missing from the file",
      "another model"]),
    ("a pickled model as weights", lambda p: ["--input", "1x3x16x16", "--weights", str(_pickled_model(p))], 2,
     ["torch.nn.modules.container.Sequential", "torch.save(model.state_dict(), path)"]),
    ("an unknown pass", lambda p: ["--input", "1x3x16x16", "--skip", "conv_bnn"], 2,
     ["no pass named 'conv_bnn'", "conv_bn"]),
    ("a bad shape", lambda p: ["--input", "1x3xa"], 2, ["expected a shape like 1x3x224x224"]),
    ("an unknown device", lambda p: ["--input", "1x3x16x16", "--device", "gpu"], 2, ["expected a device like cpu"]),
    ("--out in a missing folder", lambda p: ["--input", "1x3x16x16", "--out", str(p / "no" / "m.pt2")], 2,
     ["does not exist"]),
    ("--out with a suffix it cannot write", lambda p: ["--input", "1x3x16x16", "--out", str(p / "m.bin")], 2,
     ["m.bin", ".pt2 (a torch.export program)", ".onnx (an ONNX model)"]),
    ("--out .onnx for an AOTInductor package", lambda p: ["--input", "1x3x16x16", "--backend", "aot_inductor",
                                                          "--out", str(p / "m.onnx")], 2,
     ["--backend aot_inductor writes .pt2"]),
]


@pytest.mark.parametrize(("make_args", "code", "phrases"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_are_one_line_with_the_fix(tmp_path, capsys, make_args, code, phrases):
    got, _, err = cli(capsys, "optimize", f"{_model_file(tmp_path)}:build", *make_args(tmp_path), "--quiet")
    line = _one_error_line(err)
    assert got == code, line
    for phrase in phrases:
        assert phrase in line, (phrase, line)


@pytest.mark.parametrize(("model", "phrases"), [
    ("timm:repvgg_a00", ["timm has no model 'repvgg_a00'", "did you mean repvgg_a0", "timm.list_models()"]),
    ("torchvision:resnet_18", ["torchvision has no model 'resnet_18'", "resnet18"]),
    ("nonsense", ["MODEL must be timm:NAME, torchvision:NAME or path/to/file.py:factory"]),
    ("missing.py:build", ["no such file"]),
])
def test_an_unknown_model_is_one_line_with_close_names(capsys, model, phrases):
    code, _, err = cli(capsys, "optimize", model, "--input", "1x3x16x16", "--quiet")
    line = _one_error_line(err)
    assert code == 2
    for phrase in phrases:
        assert phrase in line, (phrase, line)


def test_a_file_without_the_factory_lists_what_it_defines(tmp_path, capsys):
    code, _, err = cli(capsys, "optimize", f"{_model_file(tmp_path)}:bild", "--input", "1x3x16x16", "--quiet")
    assert code == 2 and "has no function 'bild'; it defines build" in _one_error_line(err)


def test_a_model_that_cannot_be_captured_is_one_line(tmp_path, capsys):
    """torch.export prints the partial graph to stderr; the command line shows the one-line reason only."""
    code, _, err = cli(capsys, "optimize", f"{_model_file(tmp_path)}:branchy", "--input", "1x3x16x16", "--quiet")
    line = _one_error_line(err)
    assert code == 1 and "branches on a tensor's value" in line and "if x.sum() > 0" in line and "Remedy" in line


def test_device_cuda_runs_or_says_it_is_not_available(tmp_path, capsys):
    code, out, err = cli(capsys, "optimize", f"{_model_file(tmp_path)}:build", "--input", "1x3x16x16", "--device",
                         "cuda", "--quiet")
    if torch.cuda.is_available():
        assert code == 0 and "verification: ok" in out, err
    else:
        line = _one_error_line(err)
        assert code == 2 and "CUDA is not available" in line and "--device cpu" in line


# ----------------------------------------------------------------------------------------------- help


def _options_without_help(text: str) -> list[str]:
    """Entries of the option and argument sections of an argparse --help output that have no help text (on their
    line, or on the next line indented further)."""
    lines = text.splitlines()
    missing, section = [], False
    for i, line in enumerate(lines):
        if re.match(r"^(options|optional arguments|positional arguments):$", line):
            section = True
        elif not line.strip():
            section = False
        elif section and re.match(r"^  \S", line):
            has_text = re.match(r"^  \S.*?\s{2,}\S", line) is not None
            continued = i + 1 < len(lines) and re.match(r"^\s{4,}\S", lines[i + 1]) is not None
            if not (has_text or continued):
                missing.append(line.strip())
    return missing


@pytest.mark.parametrize("command", [[], ["demo"], ["optimize"], ["bench"], ["passes"]])
def test_help_is_plain_text_and_every_option_has_help(capsys, command):
    assert _options_without_help("options:\n  --seed SEED\n  --x X  text\n") == ["--seed SEED"]  # the check works
    code, out, _ = cli(capsys, *command, "--help")
    assert code == 0 and "usage: fxreparam" in out
    assert "``" not in out and ":func:" not in out and ":mod:" not in out, out
    options = [line for line in out.splitlines() if re.match(r"^  -", line)]
    assert options and not _options_without_help(out), _options_without_help(out)
    if command in (["optimize"], ["bench"]):
        for option in ("--input", "--dtype", "--device", "--capture", "--backend", "--seed", "--threads", "--quiet",
                       "--debug", "--skip", "--weights"):
            assert option in out, option


# ----------------------------------------------------------------------------------------------- inputs, dtype


def test_several_inputs_an_integer_input_and_a_dtype(tmp_path, capsys):
    out_path = tmp_path / "two.pt2"
    code, out, err = cli(capsys, "optimize", f"{_model_file(tmp_path)}:two", "--input", "2x3x16x16", "--input",
                         "2x7:int64", "--dtype", "float64", "--out", str(out_path))
    assert code == 0, err
    assert "verification: ok" in out and "capturing" in err  # progress on stderr unless --quiet
    loaded = fxreparam.load(out_path)
    x, tokens = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (2, 7))
    assert loaded(x, tokens).dtype == torch.float64


def test_bench_prints_a_speedup_table_with_threads_and_dtype(tmp_path, capsys):
    threads = torch.get_num_threads()
    code, out, err = cli(capsys, "bench", f"{_model_file(tmp_path)}:build", "--input", "1x3x16x16", "--repeat", "3",
                         "--threads", "1", "--dtype", "bfloat16", "--quiet")
    assert code == 0, err
    assert err == ""  # --quiet: no progress lines
    assert "bfloat16, cpu, 1 thread, 3 interleaved runs per variant" in out  # "1 thread", not "1 threads"
    assert re.search(r"min ms\s+median ms\s+max ms\s+speedup", out)
    assert re.search(r"original  eager\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+1\.00x", out) and "folded    eager" in out
    assert torch.get_num_threads() == threads  # --threads lasts for the command only


@pytest.mark.parametrize(("folded", "warned"), [((1.0, 1.1, 1.3), False), ((1.5, 1.8, 2.5), True)])
def test_bench_times_the_variants_together_and_warns_when_the_ranges_overlap(tmp_path, capsys, monkeypatch,
                                                                             folded, warned):
    """One interleaved timing of every variant (the rows were timed one after another, on a loaded machine 38 ms
    then 602 ms for one model); min / median / max printed; a warning where [min, max] ranges overlap."""
    calls = []

    def fake_spreads(fns, x, repeat, warmup=3):
        calls.append(sorted(fns))
        for fn in fns.values():
            fn(x)  # each variant runs on the inputs
        return {"original eager": Spread(2.0, 2.2, 2.6), "folded eager": Spread(*folded)}

    monkeypatch.setattr(fxreparam.cli, "spread_interleaved", fake_spreads)
    code, out, err = cli(capsys, "bench", f"{_model_file(tmp_path)}:build", "--input", "1x3x16x16", "--quiet")
    assert code == 0, err
    assert calls == [["folded eager", "original eager"]]
    median = folded[1]
    assert re.search(rf"folded    eager\s+{folded[0]:.2f}\s+{median:.2f}\s+{folded[2]:.2f}\s+{2.2 / median:.2f}x", out)
    assert ("overlaps the original's (2.00-2.60 ms)" in out) is warned, out


def test_interleaved_times_take_turns_run_by_run():
    order = []
    times = interleaved_times({"a": lambda x: order.append("a"), "b": lambda x: order.append("b")},
                              torch.zeros(1), repeat=3, warmup=1)
    assert order == ["a", "b"] * 4 and {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(1.0, 2.0, 3.0)
    assert Spread(1, 2, 3).overlaps(Spread(3, 4, 5)) and not Spread(1, 2, 3).overlaps(Spread(3.5, 4, 5))


ONNX_MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(ONNX_MISSING), reason=f"writing and checking ONNX needs {', '.join(ONNX_MISSING)}")
def test_out_onnx_writes_onnx_not_a_torch_export_archive(tmp_path, capsys):
    """``--out model.onnx`` wrote a torch.export zip archive under an .onnx name; the suffix picks the format."""
    import onnx
    import onnxruntime

    model_file, weights, path = _model_file(tmp_path), tmp_path / "weights.pt", tmp_path / "model.onnx"
    spec = importlib.util.spec_from_file_location("mymodel", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build().eval()
    torch.save(model.state_dict(), weights)
    code, out, err = cli(capsys, "optimize", f"{model_file}:build", "--weights", str(weights), "--input",
                         "2x3x16x16", "--out", str(path), "--quiet")
    assert code == 0, err
    assert f"saved: {path} (ONNX" in out and not zipfile.is_zipfile(path)
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 16, 16)  # another batch: the batch axis is dynamic
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- backends


def test_report_for_backend_inductor(tmp_path, capsys):
    code, out, err = cli(capsys, "optimize", f"{_model_file(tmp_path)}:build", "--input", "1x3x16x16", "--backend",
                         "inductor", "--quiet")
    assert code == 0, err
    assert "fxreparam report for Sequential" in out and "verification: ok" in out
    assert re.search(r"inductor: compiled with freezing .* difference to the folded eager model", out)


def test_report_for_backend_aot_inductor(tmp_path, capsys, monkeypatch):
    """The report prints for every backend (AOTInductor's result is a runner, which carries none); the package
    build itself is replaced here (the slow test below builds one)."""
    built = []

    def fake_aot_inductor(folded, example_inputs, path):
        built.append(path)
        return (lambda *args: folded(*args)), Path(path)

    monkeypatch.setattr(deploy, "aot_inductor", fake_aot_inductor)
    code, out, err = cli(capsys, "optimize", f"{_model_file(tmp_path)}:build", "--input", "1x3x16x16", "--backend",
                         "aot_inductor", "--out", str(tmp_path / "m.pt2"), "--quiet")
    assert code == 0, err
    assert "fxreparam report for Sequential" in out and "verification: ok" in out
    assert f"saved: {tmp_path / 'm.pt2'} (an AOTInductor package" in out and built


def test_tensorrt_without_torch_tensorrt_says_what_to_install_before_folding(tmp_path, capsys):
    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip("torch-tensorrt is installed here")
    code, _, err = cli(capsys, "optimize", f"{_model_file(tmp_path)}:build", "--input", "1x3x16x16", "--backend",
                       "tensorrt", "--quiet")
    assert code == 2 and "pip install 'fxreparam[tensorrt]'" in _one_error_line(err)


@pytest.mark.slow
def test_aot_inductor_package_from_the_command_line_loads_with_fxreparam_load(tmp_path, capsys):
    """About 30 s on the 2-core machine: one AOTInductor build."""
    path = tmp_path / "m.pt2"
    code, out, err = cli(capsys, "optimize", f"{_model_file(tmp_path)}:build", "--input", "1x3x16x16", "--backend",
                         "aot_inductor", "--out", str(path), "--quiet")
    assert code == 0, err
    assert "fxreparam report for Sequential" in out and "AOTInductor package" in out
    assert deploy._kind(path) == "aot_inductor"
    runner = fxreparam.load(path)
    assert runner(torch.randn(3, 3, 16, 16)).shape == (3, 8, 16, 16)


# ----------------------------------------------------------------------------------------------- load


def test_load_says_what_a_file_is(tmp_path):
    """Both artifacts are .pt2 zip archives: load tells them apart by content and names anything else."""
    fake = tmp_path / "fake.pt2"  # an AOTInductor package's layout, with no compiled model in it
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("fake/data/aotinductor/model/x.wrapper.cpp", "")
        archive.writestr("fake/archive_format", "pt2")
    assert deploy._kind(fake) == "aot_inductor"
    with pytest.raises(fxreparam.FxReparamError, match=r"is an AOTInductor package, but torch .* could not load it"):
        fxreparam.load(fake)
    state = tmp_path / "weights.pt2"
    torch.save({"w": torch.zeros(2)}, state)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("readme.txt", "hello")
    text = tmp_path / "notes.pt2"
    text.write_text("hello")
    for path, phrase in [(state, "a torch.save file"), (other, "neither kind (1 entries"), (text, "not a zip archive"),
                         (tmp_path / "missing.pt2", "no such file"), (tmp_path, "a directory")]:
        with pytest.raises(fxreparam.FxReparamError) as info:
            fxreparam.load(path)
        assert phrase in str(info.value) and "\n" not in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------------------- passes, benchmark


def test_passes_lists_every_registered_pass(capsys):
    code, out, _ = cli(capsys, "passes")
    assert code == 0
    for name in ("fold_constants", "conv_bn", "branch_sum", "identity", "sequential", "prune_zero_channels", "cleanup"):
        assert name in out


def test_compare_benchmark_compiles_each_variant_once_and_for_itself():
    """The variants are timed taking turns: each must run code compiled for it, once. Dynamo keeps compiled code
    per code object, so a second torch.compile of one model with other options reused the first one's code
    (the benchmark's (g) ran (e)'s), and a reset between variants made every one compile again without its
    settings. Each variant now has a forward of its own, holding exactly its own compiled entry."""
    from torch import nn
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compare
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    fns = {variant: compare.compiled(variant, model, x)[0] for variant in ("e", "g")}
    with torch.no_grad():
        for fn in fns.values():
            assert torch.allclose(fn(x), model(x), atol=1e-5)
    codes = {variant: fn._orig_mod.forward.__code__ for variant, fn in fns.items()}
    assert codes["e"] is not codes["g"]
    assert all(len(_debug_get_cache_entry_list(code)) == 1 for code in codes.values())


@pytest.mark.slow  # about a minute of Inductor compiles
def test_compare_benchmark_cpu_quick(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "compare_cpu_quick.md").read_text()
    assert "| acnet | 1x3x32x32 | float32 |" in table
    assert re.search(r"\| acnet \| 1x3x32x32 \| \d+ \| cold \| \d+\.\d \|", table)  # compiled in a process of its own
    assert (tmp_path / "compare_cpu_quick.png").stat().st_size > 1000
