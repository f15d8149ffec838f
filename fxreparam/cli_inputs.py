"""What the command line turns its arguments into: the model, its weights, the example inputs, the device.

Every problem found here is a :class:`CommandError` whose message is one line naming the problem and the
fix, so that :func:`fxreparam.cli.main` can print it without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import inspect
import pickle
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DTYPES", "INPUT_DTYPES", "CommandError", "InputSpec", "UsageError", "check_arity", "check_device",
           "load_model", "load_weights", "make_inputs", "parse_device", "parse_input", "parse_shape"]

MODEL_FORMS = "timm:NAME, torchvision:NAME or path/to/file.py:factory"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                                  "float64": torch.float64}
INPUT_DTYPES: dict[str, torch.dtype] = {**DTYPES, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


class CommandError(Exception):
    """A failure the command line reports as one line (exit code 1): the model or the fold went wrong."""

    code = 1


class UsageError(CommandError):
    """An argument on the command line is wrong (exit code 2): the message says which and how to fix it."""

    code = 2


# ----------------------------------------------------------------------------------------------- arguments


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224`` as a shape tuple (argparse type): positive sizes separated by ``x``."""
    try:
        shape = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected a shape like 1x3x224x224, got {text!r}")
    return shape


@dataclass(frozen=True)
class InputSpec:
    """One ``--input``: a shape and, where given after a colon, the input's own dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None = None

    def __str__(self) -> str:
        """As typed on the command line: ``1x3x16x16`` or ``1x10:int64``."""
        dtype = "" if self.dtype is None else ":" + str(self.dtype).removeprefix("torch.")
        return "x".join(map(str, self.shape)) + dtype


def parse_input(text: str) -> InputSpec:
    """``SHAPE`` or ``SHAPE:DTYPE`` (argparse type), e.g. ``1x3x224x224`` or ``1x128:int64``."""
    shape_text, _, dtype_text = text.partition(":")
    shape = parse_shape(shape_text)
    if not dtype_text:
        return InputSpec(shape)
    if dtype_text not in INPUT_DTYPES:
        raise argparse.ArgumentTypeError(f"unknown input dtype {dtype_text!r} in {text!r}; choose one of "
                                         f"{', '.join(INPUT_DTYPES)}")
    return InputSpec(shape, INPUT_DTYPES[dtype_text])


def parse_device(text: str) -> torch.device:
    """A ``torch.device`` from ``cpu``, ``cuda``, ``cuda:1``, ``mps`` (argparse type); availability is checked later."""
    try:
        return torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device like cpu, cuda or cuda:0, got {text!r}") from None


def check_device(device: torch.device) -> None:
    """Raise :class:`UsageError` where ``device`` does not exist on this machine, before any model is loaded."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {device}: CUDA is not available here ({why}; torch {torch.__version__}): "
                             "use --device cpu, or run on a machine with an NVIDIA GPU and a CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return
    backend = getattr(torch.backends, device.type, None) if device.type == "mps" else getattr(torch, device.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise UsageError(f"--device {device}: no {device.type} device is available here: use --device cpu")


# ----------------------------------------------------------------------------------------------- inputs


def make_inputs(specs: Sequence[InputSpec], dtype: torch.dtype, device: torch.device,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Random example inputs: floats from a normal distribution in ``dtype`` (or the input's own), integers 0 or 1."""
    inputs = []
    for spec in specs:
        kind = spec.dtype or dtype
        if kind.is_floating_point:
            x = torch.randn(spec.shape, generator=generator, dtype=torch.float32).to(kind)
        else:
            x = torch.randint(0, 2, spec.shape, generator=generator).to(kind)
        inputs.append(x.to(device))
    return tuple(inputs)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter or buffer (float32 where it has none)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def check_arity(model: nn.Module, count: int) -> None:
    """Raise :class:`UsageError` where ``forward`` cannot take ``count`` positional inputs (one per ``--input``)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) <= count <= len(positional):
        return
    names = ", ".join(p.name for p in positional)
    takes = (f"{len(required)} to {len(positional)}" if len(required) != len(positional) else str(len(positional)))
    raise UsageError(f"{type(model).__name__}.forward takes {takes} positional input(s) ({names}) and "
                     f"{count} --input option(s) were given: give one --input per input, in order "
                     "(e.g. --input 1x3x224x224 --input 1x10)")


# ----------------------------------------------------------------------------------------------- models


def _suggest(name: str, known: Sequence[str], lister: str) -> str:
    """``; did you mean a, b?`` with the names closest to ``name`` (substring matches first), and where to list all."""
    lowered = name.lower()
    close = [n for n in known if lowered in n.lower()][:5]
    close += [n for n in difflib.get_close_matches(lowered, known, n=5, cutoff=0.6) if n not in close]
    hint = f"; did you mean {', '.join(close[:5])}?" if close else ""
    return f"{hint} ({lister} lists all {len(known)})"


def _timm(name: str) -> nn.Module:
    """``timm.create_model(name)`` without pretrained weights; an unknown name suggests close ones."""
    try:
        import timm
    except ImportError:
        raise UsageError("timm:NAME needs timm: pip install timm") from None
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        raise UsageError(f"timm has no model {name!r}{_suggest(name, timm.list_models(), 'timm.list_models()')}"
                         ) from None


def _torchvision(name: str) -> nn.Module:
    """``torchvision.models.get_model(name)`` without pretrained weights; an unknown name suggests close ones."""
    try:
        import torchvision
    except ImportError:
        raise UsageError("torchvision:NAME needs torchvision: pip install torchvision") from None
    known = torchvision.models.list_models()
    if name not in known:
        raise UsageError(f"torchvision has no model {name!r}"
                         f"{_suggest(name, known, 'torchvision.models.list_models()')}")
    return torchvision.models.get_model(name, weights=None)


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    """``folder`` first on ``sys.path`` for the duration, so a model file can import its neighbours."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def _from_file(spec: str) -> nn.Module:
    """The module a factory function in a Python file returns (``path/to/file.py:factory``)."""
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise UsageError(f"MODEL {spec!r}: no such file {file!r} (MODEL is {MODEL_FORMS})")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"MODEL {spec!r}: {file} is not a Python file (MODEL is {MODEL_FORMS})")
    module = importlib.util.module_from_spec(module_spec)
    with _on_path(path.resolve().parent):
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise CommandError(f"{file} failed to import: {type(err).__name__}: {err}: fix the file") from err
    factory = getattr(module, name, None)
    if not callable(factory):
        defined = [n for n, v in vars(module).items() if callable(v) and getattr(v, "__module__", None) == path.stem]
        listing = f"; it defines {', '.join(defined)}" if defined else ""
        raise UsageError(f"{file} has no function {name!r}{listing}: MODEL is {file}:FUNCTION, a function that "
                         "returns the model")
    try:
        model = factory()
    except Exception as err:
        raise CommandError(f"{file}:{name}() raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise UsageError(f"{file}:{name}() returned a {type(model).__name__}, not a torch.nn.Module: MODEL names a "
                         "function that returns the model")
    return model


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """The model named by ``timm:NAME``, ``torchvision:NAME`` or ``file.py:factory``, with ``weights``, in eval mode."""
    kind, sep, name = spec.partition(":")
    if not sep or not kind or not name:
        more = f" (a file needs the function that builds the model: {spec}:build)" if spec.endswith(".py") else ""
        raise UsageError(f"MODEL must be {MODEL_FORMS}, not {spec!r}{more}")
    if kind == "timm":
        model = _timm(name)
    elif kind == "torchvision":
        model = _torchvision(name)
    else:
        model = _from_file(spec)
    if weights:
        load_weights(model, weights, spec)
    return model.eval()


# ----------------------------------------------------------------------------------------------- weights


def _read_state(path: Path) -> Any:
    """What a weights file holds: ``torch.load(weights_only=True)``, or safetensors for ``.safetensors``."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UsageError(f"--weights {path}: reading .safetensors needs safetensors: pip install safetensors"
                             ) from None
        try:
            return load_file(str(path))
        except Exception as err:
            raise UsageError(f"--weights {path} is not a safetensors file safetensors can read ({err})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise UsageError(f"--weights {path} pickles a {found.group(1)}, not just tensors (torch.load with "
                             "weights_only=True does not run pickled code): save the state dict instead, "
                             "torch.save(model.state_dict(), path)") from err
        raise UsageError(f"--weights {path} is not a file torch.load reads: pass a state dict saved with "
                         "torch.save(model.state_dict(), path) or a .safetensors file") from err
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--weights {path} is not a file torch.load reads ({first}): pass a state dict saved with "
                         "torch.save(model.state_dict(), path) or a .safetensors file") from err


def _mismatch(model: nn.Module, state: Mapping[str, Any]) -> str:
    """The keys where ``state`` and the model disagree, in words: counts, and the first of each kind."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) of the model missing from the file (first {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} key(s) in the file the model does not have (first {unexpected[0]!r})")
    if shaped:
        k = shaped[0]
        parts.append(f"{len(shaped)} of another shape (first {k!r}: {list(state[k].shape)} in the file, "
                     f"{list(own[k].shape)} in the model)")
    return ", ".join(parts)


def load_weights(model: nn.Module, weights: str, spec: str) -> None:
    """Load the state dict in ``weights`` into ``model``; a file that does not fit says which keys and how to fix."""
    path = Path(weights)
    if not path.is_file():
        raise UsageError(f"--weights {weights}: no such file")
    state = _read_state(path)
    if not isinstance(state, Mapping):
        raise UsageError(f"--weights {weights} holds a {type(state).__name__}, not a state dict (parameter names to "
                         "tensors): save it with torch.save(model.state_dict(), path)")
    if state and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = [k for k, v in state.items() if isinstance(v, Mapping)]
        raise UsageError(f"--weights {weights} holds no tensors at its top level (keys {list(state)[:6]}): it looks "
                         f"like a training checkpoint; save the state dict it holds"
                         + (f", e.g. torch.save(checkpoint[{nested[0]!r}], path)" if nested else ""))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = _mismatch(model, state) or str(err).strip().splitlines()[-1].strip()
        hint = ""
        if all(str(k).startswith("module.") for k in state):
            hint = " (every key starts with 'module.': saved from DataParallel; save model.module.state_dict())"
        raise UsageError(f"--weights {weights} does not fit {spec}: {detail}{hint}. The weights are for another model "
                         "or configuration: pass the MODEL they were saved from, or weights saved from this one "
                         "with torch.save(model.state_dict(), path)") from err
