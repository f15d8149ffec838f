"""What a plain install ships and the names the README documents: torch-only, so the wheel check runs it too."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import fxreparam

ROOT = Path(__file__).resolve().parents[1]


def _package_dirs(root: Path, name: str) -> set[str]:
    """Every package under ``root`` (a folder with an ``__init__.py``), named as it is imported, as ``name.*``."""
    return {".".join((name, *init.parent.relative_to(root).parts)) for init in root.rglob("__init__.py")
            if "__pycache__" not in init.parts}


def test_setuptools_discovery_ships_every_package(monkeypatch):
    """The wheel holds every package of the checkout (fxreparam.expand was missing from the hand-written list)."""
    pytest.importorskip("setuptools", reason="the packaging metadata is read with setuptools")
    monkeypatch.chdir(ROOT)  # discovery searches the current folder, as a build in the checkout does
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    dist.set_defaults()  # setuptools' package discovery, as a build runs it
    expected = _package_dirs(ROOT / "fxreparam", "fxreparam") | _package_dirs(ROOT / "passes", "fxreparam.passes")
    assert {"fxreparam.expand", "fxreparam.passes"} <= expected
    assert set(dist.packages) >= expected


@pytest.mark.parametrize(("name", "function"), [("capture", "capture"), ("report", "report"), ("expand", "expand")])
def test_public_modules_are_modules_and_still_callable(name, function):
    """``import fxreparam.capture`` gives the module (the function shadowed it), and the module still calls."""
    module = importlib.import_module(f"fxreparam.{name}")
    assert isinstance(getattr(fxreparam, name), types.ModuleType) and getattr(fxreparam, name) is module
    assert callable(module) and callable(getattr(module, function))


def test_documented_names_resolve_and_old_spellings_work():
    """The README's names: ``fxreparam.expand.RepVGGBlock``, and the calls ``expand(...)``, ``report(...)``."""
    assert issubclass(fxreparam.expand.RepVGGBlock, nn.Module)
    assert fxreparam.expand.RepVGGBlock is importlib.import_module("fxreparam.expand.blocks").RepVGGBlock
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    expanded = fxreparam.expand(model, "repvgg")
    assert isinstance(expanded[0], fxreparam.expand.RepVGGBlock)
    x = torch.randn(2, 3, 8, 8)
    captured = fxreparam.capture(model, (x,))
    assert isinstance(captured, fxreparam.capture.Captured)
    assert fxreparam.report(fxreparam.optimize(expanded.eval(), x)).verification.ok


def test_callable_module_helper_takes_a_package_as_well_as_a_file():
    """The helper works whether a submodule is a file or a package (capture may become ``fxreparam/capture/``)."""
    package = types.ModuleType("fxreparam._probe_package")
    package.__path__ = []  # a package
    package.probe = lambda value: value + 1
    sys.modules[package.__name__] = package
    try:
        made = fxreparam._callable_module("_probe_package", package.probe)
        assert made is package and isinstance(made, types.ModuleType) and made(1) == 2
        assert made.probe is not None and made.__path__ == []
    finally:
        del sys.modules[package.__name__]


def test_a_torch_only_model_folds_and_verifies():
    """The core install folds a plain conv-BN model exactly (what the wheel check runs in a torch-only venv)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4)).eval()
    folded = fxreparam.optimize(model, torch.randn(1, 3, 16, 16))
    rep = fxreparam.report(folded)
    assert rep.verification.ok and (rep.after.batch_norm, rep.after.conv) == (0, 2)
