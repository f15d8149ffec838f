"""The errors fxreparam raises; each message names the node or module and says what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .verify import Verification

__all__ = ["CaptureError", "CaptureInputError", "FxReparamError", "ShapeError", "VerificationError"]


class FxReparamError(RuntimeError):
    """Base class of every fxreparam error."""


class CaptureError(FxReparamError):
    """The model could not be turned into a graph: neither ``torch.export`` nor ``symbolic_trace`` took it."""


class CaptureInputError(CaptureError, ValueError):
    """The model or its example inputs cannot be captured as given (meta weights, numpy inputs, wrong shapes)."""


class ShapeError(FxReparamError, ValueError):
    """A captured or folded module was called with input shapes its capture does not cover."""


class VerificationError(FxReparamError):
    """The optimized model's outputs differ from the original's (a pass made an inexact rewrite), or could not be
    compared at all.

    ``pass_name`` is the first pass after which the outputs diverge (``"capture"`` where the captured graph itself
    does, None where nothing could be compared);
    ``error`` and ``tolerance`` the relative error seen at the worst channel and the error allowed there;
    ``verification`` the full :class:`~fxreparam.verify.Verification`.
    """

    def __init__(self, message: str, *, pass_name: str | None, error: float, tolerance: float,
                 verification: Verification | None = None) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.error = error
        self.tolerance = tolerance
        self.verification = verification
