"""The command line: optimize and bench a model from a file with saved weights, and the benchmark script."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxreparam.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def _model_file(tmp_path: Path) -> Path:
    path = tmp_path / "mymodel.py"
    path.write_text(textwrap.dedent("""
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    """))
    return path


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
    assert "verification: ok" in out.stdout and "saved:" in out.stdout
    assert "capturing" in out.stderr  # progress goes to stderr
    loaded = torch.export.load(str(tmp_path / "folded.pt2")).module()
    x = torch.randn(1, 3, 16, 16)
    model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_bench_prints_a_speedup_table(tmp_path):
    out = run("bench", f"{_model_file(tmp_path)}:build", "--input", "1x3x16x16", "--repeat", "3")
    assert out.returncode == 0, out.stderr
    assert "original  eager" in out.stdout and "folded    eager" in out.stdout and "x" in out.stdout


def test_bad_model_spec_is_a_clear_error(tmp_path):
    out = run("optimize", "nonsense", "--input", "1x3x8x8")
    assert out.returncode != 0 and "timm:NAME" in out.stderr
    out = run("optimize", f"{tmp_path / 'missing.py'}:build", "--input", "1x3x8x8")
    assert out.returncode != 0 and "no such file" in out.stderr


def test_passes_lists_every_registered_pass():
    out = run("passes")
    assert out.returncode == 0
    for name in ("fold_constants", "conv_bn", "branch_sum", "identity", "sequential", "prune_zero_channels", "cleanup"):
        assert name in out.stdout


def test_compare_benchmark_cpu_quick(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "compare_cpu_quick.md").read_text()
    assert "| acnet | 1x3x32x32 | float32 |" in table
    assert (tmp_path / "compare_cpu_quick.png").stat().st_size > 1000
