"""The errors fxreparam raises; each message names the node or module and says what to do."""

from __future__ import annotations

__all__ = ["CaptureError", "FxReparamError", "VerificationError"]


class FxReparamError(RuntimeError):
    """Base class of every fxreparam error."""


class CaptureError(FxReparamError):
    """The model could not be turned into a graph: neither ``torch.export`` nor ``symbolic_trace`` took it."""


class VerificationError(FxReparamError):
    """The optimized model's outputs differ from the original's: a pass made an inexact rewrite.

    ``pass_name`` is the first pass after which the outputs diverge; ``error`` the relative error seen.
    """

    def __init__(self, message: str, *, pass_name: str | None, error: float, tolerance: float) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.error = error
        self.tolerance = tolerance
