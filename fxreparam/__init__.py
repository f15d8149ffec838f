"""fxreparam: fold structurally re-parameterized models (RepVGG, ACNet, DBB, DiracNet, ...) into plain convs.

``fxreparam.optimize(model, example_inputs)`` captures the model as a graph, runs the
registered rewrite passes to a fixpoint, verifies the result against the original and
returns a new module; ``fxreparam.report(result)`` says what was folded and what was not.
"""

from __future__ import annotations

from . import (
    algebra,
    ops,
    passes,  # noqa: F401  (registers the built-in passes)
)
from .api import optimize
from .backends import fxreparam_backend, region_reports
from .capture import capture
from .deploy import export_onnx, load, save
from .errors import CaptureError, FxReparamError, VerificationError
from .registry import Pass, PassContext, Refusal, get_pass, list_passes, register_pass, unregister_pass
from .report import OpCounts, Report, count_ops, report
from .verify import Verification

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "FxReparamError",
    "OpCounts",
    "Pass",
    "PassContext",
    "Refusal",
    "Report",
    "Verification",
    "VerificationError",
    "algebra",
    "capture",
    "count_ops",
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
