"""The examples and the demo command run and report a verified fold."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("script", "args"), [
    ("diracnet.py", ["--size", "64", "--depth", "10"]),
    ("repvgg.py", ["--size", "32"]),
    ("acnet.py", ["--size", "16"]),
    ("dbb.py", ["--size", "32"]),
    ("resrep.py", ["--size", "16"]),
    pytest.param("mobileone.py", ["--size", "64"], marks=pytest.mark.slow),  # tests/test_timm.py covers the model
])
def test_example_runs_and_verifies(script, args):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    assert "verification: ok" in out and "folded" in out


def test_demo_command_prints_the_report():
    out = subprocess.run([sys.executable, "-m", "fxreparam.cli", "demo", "--quiet", "--input", "1x3x64x64"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    assert "fxreparam report for DiracNet" in out and "verification: ok" in out
    assert re.search(r"batch_norm\s+17\s+0", out)
