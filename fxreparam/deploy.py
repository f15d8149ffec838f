"""Deployment artifacts of a folded model: a ``torch.export`` program file, ONNX, AOTInductor, TensorRT.

Every function takes the module :func:`fxreparam.optimize` returned and the example inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FxReparamError

__all__ = ["aot_inductor", "export_onnx", "load", "save", "tensorrt"]


def _args(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def save(folded: nn.Module, path: str | os.PathLike, example_inputs: Any) -> Path:
    """Write ``folded`` as a ``torch.export`` program (``.pt2``): weights and graph, no pickled code."""
    program = torch.export.export(folded, _args(example_inputs), strict=False)
    torch.export.save(program, str(path))
    return Path(path)


def load(path: str | os.PathLike) -> nn.Module:
    """Load a program written by :func:`save` as a callable module (in any process, without the model's code)."""
    return torch.export.load(str(path)).module()


def export_onnx(folded: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int | None = None
                ) -> Path:
    """Write ``folded`` as an ONNX file (the usual road to ``trtexec``) with torch's dynamo exporter."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise FxReparamError("export_onnx needs onnx and onnxscript: pip install 'fxreparam[onnx]'") from err
    kwargs = {"opset_version": opset} if opset is not None else {}
    torch.onnx.export(folded, _args(example_inputs), str(path), dynamo=True, **kwargs)
    return Path(path)


def aot_inductor(folded: nn.Module, example_inputs: Any, path: str | os.PathLike) -> tuple[Any, Path]:
    """Compile ``folded`` ahead of time into an AOTInductor package; returns the loaded runner and the path."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    program = torch.export.export(folded, _args(example_inputs), strict=False)
    written = aoti_compile_and_package(program, package_path=str(path))
    return aoti_load_package(written), Path(written)


def tensorrt(folded: nn.Module, example_inputs: Any, *, precision: str = "fp32",
             shapes: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
             path: str | os.PathLike | None = None) -> nn.Module:
    """Build a TensorRT engine from ``folded`` with torch-tensorrt's dynamo frontend.

    ``precision``: ``"fp32"`` or ``"fp16"``; ``shapes``: one ``(min, opt, max)`` per input for dynamic
    shapes, else the example inputs' shapes. With ``path`` the result is saved there too
    (``torch_tensorrt.save``; reload with ``torch_tensorrt.load(path).module()``).
    """
    try:
        import torch_tensorrt
    except ImportError as err:
        raise FxReparamError("backend='tensorrt' needs TensorRT and torch-tensorrt: pip install "
                             "'fxreparam[tensorrt]' on a machine with an NVIDIA GPU") from err
    precisions = {"fp32": {torch.float32}, "fp16": {torch.float16, torch.float32}}
    if precision not in precisions:
        raise ValueError(f"precision must be one of {sorted(precisions)}, not {precision!r}")
    args = _args(example_inputs)
    if shapes is None:
        inputs = [torch_tensorrt.Input(shape=tuple(a.shape), dtype=a.dtype) for a in args]
    else:
        inputs = [torch_tensorrt.Input(min_shape=tuple(lo), opt_shape=tuple(opt), max_shape=tuple(hi), dtype=a.dtype)
                  for (lo, opt, hi), a in zip(shapes, args)]
    engine = torch_tensorrt.compile(folded, ir="dynamo", inputs=inputs, enabled_precisions=precisions[precision])
    if path is not None:
        torch_tensorrt.save(engine, str(path), inputs=list(args))
    return engine
