"""fxreparam: fold structurally re-parameterized models (RepVGG, ACNet, DBB, DiracNet, ...) into plain convs.

``fxreparam.optimize(model, example_inputs)`` captures the model as a graph, runs the
registered rewrite passes to a fixpoint, verifies the result against the original and
returns a new module; ``fxreparam.report(result)`` says what was folded and what was not.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

from . import (
    algebra,
    cost,
    ops,
    passes,  # noqa: F401  (registers the built-in passes)
)
from .api import optimize
from .backends import fxreparam_backend, region_reports
from .capture import capture as _capture
from .deploy import export_onnx, load, save
from .errors import CaptureError, CaptureInputError, FxReparamError, ShapeError, VerificationError
from .expand import expand as _expand
from .graph import emit
from .passes import BUILTIN_ORDER
from .registry import (
    Costlier,
    NotExact,
    Pass,
    PassContext,
    PassError,
    Refusal,
    get_pass,
    list_passes,
    register_pass,
    unregister_pass,
)
from .report import OpCounts, Report, count_ops
from .report import report as _report
from .verify import Verification


class _CallableModule(types.ModuleType):
    """A module that calls its namesake function: ``fxreparam.report`` is the module, ``fxreparam.report(m)`` works."""

    __call_target__: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__call_target__(*args, **kwargs)


def _callable_module(name: str, function: Callable[..., Any]) -> types.ModuleType:
    """Make the submodule ``fxreparam.<name>`` (a file or a package) callable as ``function``, keeping it the module."""
    module = sys.modules[f"{__name__}.{name}"]
    module.__class__ = _CallableModule
    module.__call_target__ = function
    return module


capture = _callable_module("capture", _capture)
expand = _callable_module("expand", _expand)
report = _callable_module("report", _report)

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_ORDER",
    "CaptureError",
    "CaptureInputError",
    "Costlier",
    "FxReparamError",
    "NotExact",
    "OpCounts",
    "Pass",
    "PassContext",
    "PassError",
    "Refusal",
    "Report",
    "ShapeError",
    "Verification",
    "VerificationError",
    "algebra",
    "capture",
    "cost",
    "count_ops",
    "emit",
    "expand",
    "export_onnx",
    "fxreparam_backend",
    "get_pass",
    "list_passes",
    "load",
    "ops",
    "optimize",
    "region_reports",
    "register_pass",
    "report",
    "save",
    "unregister_pass",
]
