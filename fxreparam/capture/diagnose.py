"""Why a capture failed, in words: the example inputs a model takes, the model's own code line, data-dependent
control flow; checks of example inputs before any capture."""

from __future__ import annotations

import os
import re
import traceback
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import CaptureInputError

_SYMBOL = re.compile(r"\b[su]\d+\b")


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fxreparam/


def _internal_dirs() -> tuple[str, ...]:
    """Where torch, sympy, the standard library and fxreparam live: frames there are not the model's code."""
    dirs = [_PACKAGE_DIR, os.path.dirname(os.path.abspath(torch.__file__)), os.path.dirname(os.__file__)]
    try:
        import sympy

        dirs.append(os.path.dirname(os.path.abspath(sympy.__file__)))
    except ImportError:
        pass
    return tuple(dirs)


_INTERNAL_DIRS = _internal_dirs()


def _first_lines(err: BaseException, n: int = 3) -> str:
    """The first lines of an error's message, symbolic sizes (``s77``) replaced by words."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return _SYMBOL.sub("<a dynamic size>", " ".join(lines[:n])[:500])


def _user_frame(err: BaseException) -> str:
    """``file:line (code)`` of the innermost frame of the model's own code in an error's traceback, or ''."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith(_INTERNAL_DIRS) and not f.filename.startswith("<")]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno}" + (f" ({f.line.strip()})" if f.line else "")


def _expected_input(model: nn.Module) -> str:
    """What the model's first layer takes, in words (``[N, 3, H, W]``), or '' where it has none we know."""
    spatial = ("L", "H, W", "D, H, W")
    for name, mod in model.named_modules():
        where = f"first layer, {name or type(model).__name__} ({type(mod).__name__}),"
        if isinstance(mod, nn.modules.conv._ConvNd) and 1 <= len(mod.kernel_size) <= 3:
            return f"{where} takes inputs of shape [N, {mod.in_channels}, {spatial[len(mod.kernel_size) - 1]}]"
        if isinstance(mod, nn.Linear):
            return f"{where} takes inputs of shape [..., {mod.in_features}]"
        if isinstance(mod, nn.Embedding):
            return f"{where} takes integer indices below {mod.num_embeddings}"
    return ""


def _describe(x: Any) -> str:
    """An example input in words (``a torch.float32 tensor of shape [2, 3]``, ``a numpy.ndarray``), for messages."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return f"a {type(x).__module__}.{type(x).__qualname__}" if type(x).__module__ != "builtins" else (
        f"a {type(x).__name__}")


def _check_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse, with a remedy, weights on the meta device and example inputs of types a tracer cannot take."""
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise CaptureInputError(f"{type(model).__name__}'s parameters are on the meta device ({meta[0]}, ...): there "
                           "are no weights to fold. Remedy: load real weights first (model.to_empty(device=...) "
                           "then load_state_dict, or load_state_dict(..., assign=True)).")
    leaves = pytree.tree_leaves((args, kwargs))
    for i, x in enumerate(leaves):
        if type(x).__module__ == "numpy":
            raise CaptureInputError(f"example input {i} is {_describe(x)}: pass torch tensors "
                               "(torch.from_numpy(a) or torch.as_tensor(a)).")
        if isinstance(x, torch.Tensor) and x.is_meta:
            raise CaptureInputError(f"example input {i} is on the meta device: pass real tensors.")
    if (args or kwargs) and not any(isinstance(x, torch.Tensor) for x in leaves):
        kinds = ", ".join(sorted({_describe(x) for x in leaves})) or "nothing"
        raise CaptureInputError(f"the example inputs hold no tensor ({kinds}): pass tensors, e.g. torch.tensor(values) "
                           "for a Python list of numbers.")


def _runs(model: nn.Module, args: tuple, kwargs: dict) -> BaseException | None:
    """The error the model raises on the example inputs in eager mode, or None where it runs."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as err:
        return err
    return None


def _input_mismatch(model: nn.Module, args: tuple, kwargs: dict, err: BaseException) -> CaptureInputError:
    """The error for example inputs the model itself rejects, naming what its first layer takes."""
    shapes = ", ".join(_describe(x) for x in pytree.tree_leaves((args, kwargs)))
    expected = _expected_input(model)
    return CaptureInputError(f"{type(model).__name__} does not run on the example inputs ({shapes}): "
                        f"{type(err).__name__}: {_first_lines(err)}{_user_frame(err)}. "
                        + (f"The model's {expected}. " if expected else "")  # "The model's first layer, ... takes"
                        + "Remedy: pass example inputs the model accepts (check the shape, dtype and device).")


def _classify(stage: str, err: BaseException) -> str:
    """One line saying why a tracer failed, with the model's code line where there is one."""
    text = str(err)
    where = _user_frame(err)
    if ("data-dependent" in text or "symbolically traced variables cannot be used as inputs to control flow" in text
            or type(err).__name__ in ("GuardOnDataDependentSymNode", "TraceError")):
        return (f"{stage}: the model's Python code branches on a tensor's value{where} (if/while on a tensor, "
                ".item(), bool(), int()); a graph cannot hold that")
    return f"{stage}: {type(err).__name__}: {_first_lines(err)}{where}"
