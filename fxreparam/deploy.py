"""Deployment of a folded model: eager, Inductor, a ``torch.export`` program file, ONNX, AOTInductor, TensorRT.

Every function takes the module :func:`fxreparam.optimize` returned and the example inputs. The
artifacts keep dynamic the input dims the folded module's capture kept dynamic (the batch by default, also
from a batch-1 example; those given as ``dynamic_shapes``), and a call with a shape the artifact does not
cover raises :class:`ShapeError` naming the input and the dim; an artifact never returns an output of the wrong size.
:func:`deploy` is the one place ``optimize(backend=...)`` and the command line hand a folded model to a backend.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .capture import GUARD, InputGuard, export_program, guarded_module
from .errors import FxReparamError

__all__ = ["BACKENDS", "INNER_COMPILERS", "aot_inductor", "compile_with", "deploy", "export_onnx", "load", "save",
           "tensorrt"]

BACKENDS = (None, "eager", "inductor", "aot_inductor", "tensorrt")
INNER_COMPILERS = ("inductor", "eager", "tensorrt")
_OPTIONS: dict[str | None, tuple[str, ...]] = {
    None: (), "eager": (), "aot_inductor": ("path",), "tensorrt": ("precision", "shapes", "path"),
}
_METADATA_KEY = "fxreparam_inputs"  # AOTInductor package metadata: the input spec the runner checks


def _args(example_inputs: Any) -> tuple:
    """Example inputs as a tuple of positional inputs (a lone tensor becomes a 1-tuple)."""
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


# ----------------------------------------------------------------------------------------------- deploy


def _check_options(backend: str | None, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` for options ``backend`` does not take, listing those it takes."""
    if backend == "inductor":
        known = _inductor_options()
        unknown = sorted(k for k in options if known is not None and k not in known)
        if unknown:
            raise ValueError(f"unknown backend_options {unknown} for backend='inductor': they are Inductor config "
                             "options (torch._inductor.list_options()), e.g. 'max_autotune', 'freezing'")
        return
    unknown = sorted(set(options) - set(_OPTIONS[backend]))
    if unknown:
        known_text = ", ".join(_OPTIONS[backend]) or "none"
        raise ValueError(f"unknown backend_options {unknown} for backend={backend!r}; known: {known_text}")


def _inductor_options() -> set[str] | None:
    """The Inductor config option names, or None where this torch does not list them."""
    try:
        from torch._inductor import list_options
    except ImportError:
        return None
    return set(list_options())


def deploy(folded: nn.Module, backend: str | None, args: tuple | None, options: dict[str, Any] | None = None
           ) -> Any:
    """``folded`` handed to ``backend`` (one of :data:`BACKENDS`) with its ``options``, checked first.

    ``None``/``"eager"``: ``folded`` itself; ``"inductor"``: ``torch.compile`` with Inductor, weights frozen
    (options are Inductor config options); ``"aot_inductor"``: ``(runner, package_path)``, written to
    ``options["path"]`` or a fresh temporary directory (never the working directory); ``"tensorrt"``: see
    :func:`tensorrt`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    options = dict(options or {})
    _check_options(backend, options)
    if backend in (None, "eager"):
        return folded
    if args is None:
        raise ValueError(f"backend={backend!r} needs example inputs")
    if backend == "inductor":
        compiled = _inductor(folded, options)
        report = getattr(folded, "fxreparam_report", None)
        if report is not None:
            compiled.fxreparam_report = report
        return compiled
    if backend == "aot_inductor":
        path = options.get("path")
        if path is None:
            path = Path(tempfile.mkdtemp(prefix="fxreparam-aoti-")) / "folded.pt2"
        return aot_inductor(folded, args, path)
    return tensorrt(folded, args, **options)


def _inductor(folded: nn.Module, options: dict[str, Any]) -> nn.Module:
    """``folded`` under ``torch.compile`` with Inductor and its freezing treatment (unless ``options`` turn
    ``freezing`` off): the weights become constants of every graph Dynamo captures, whatever the config was
    while it traced (``options={"freezing": True}`` alone leaves them graph inputs)."""
    options = dict(options)
    if not options.get("freezing", True):
        return torch.compile(folded, backend="inductor", options=options)
    options.pop("freezing", None)
    from .frozen import frozen_inductor

    return torch.compile(folded, backend=frozen_inductor(options))


def compile_with(inner: str, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """Compile a folded graph with an inner compiler: ``"inductor"``, ``"eager"`` or ``"tensorrt"``."""
    if inner == "eager":
        return gm
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, list(example_inputs))
    if inner == "tensorrt":
        try:
            import torch_tensorrt  # noqa: F401  (registers the "tensorrt" dynamo backend)
        except ImportError as err:
            raise FxReparamError("inner='tensorrt' needs torch-tensorrt: pip install 'fxreparam[tensorrt]'") from err
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("tensorrt")(gm, list(example_inputs))
    raise ValueError(f"unknown inner compiler {inner!r}; choose one of {INNER_COMPILERS}")


# ----------------------------------------------------------------------------------------------- .pt2 programs


def save(folded: nn.Module, path: str | os.PathLike, example_inputs: Any) -> Path:
    """Write ``folded`` as a ``torch.export`` program (``.pt2``): weights and graph, no pickled code.

    The dims its capture kept dynamic stay dynamic, with their ranges (the batch by default, also from a batch-1
    example; those given as ``dynamic_shapes``); another model keeps every dim it does not pin in the batch dynamic.
    """
    program = export_program(folded, _args(example_inputs), {})
    torch.export.save(program, str(path))
    return Path(path)


def _kind(path: str | os.PathLike) -> str:
    """``"aot_inductor"``, ``"program"``, or a description of what else the file is (for an error message).

    Both artifacts are zip archives under one top folder: a ``torch.export`` program holds
    ``models/model.json`` (or ``serialized_exported_program.json``), an AOTInductor package
    ``data/aotinductor/``; the suffix (``.pt2`` for both) says nothing.
    """
    if os.path.isdir(path):
        return "a directory, not a file"
    if not os.path.isfile(path):
        return f"no such file: {os.fspath(path)!r}"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        what = ("; a pickle, e.g. an old-style torch.save file: read it with torch.load" if head[:1] == b"\x80" else
                "; ONNX? read it with onnxruntime" if os.fspath(path).endswith(".onnx") else "")
        return (f"not a zip archive ({os.path.getsize(path)} bytes{what}); a .pt2 file from fxreparam.save or "
                "aot_inductor is one")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any("/data/aotinductor/" in n or n.startswith("data/aotinductor/") for n in names):
        return "aot_inductor"
    if any(n.endswith(("models/model.json", "serialized_exported_program.json")) or "/models/" in n for n in names):
        return "program"
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "a zip archive of neither kind: a TorchScript archive (torch.jit.save); read it with torch.jit.load"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return ("a zip archive of neither kind: a torch.save file (a state dict or other objects); read it with "
                "torch.load, or pass a state dict to the command line as --weights")
    return f"a zip archive of neither kind ({len(names)} entries, e.g. {names[:3]})"


def load(path: str | os.PathLike) -> Any:
    """Load a file written by :func:`save` (a module) or :func:`aot_inductor` (a runner), in any process.

    Which of the two a file is is read from its content (both are ``.pt2`` zip archives). Both check their
    inputs and raise :class:`ShapeError` for a shape the artifact does not cover. Anything else, or an
    artifact this torch cannot read, raises :class:`FxReparamError` saying what the file is.
    """
    kind = _kind(path)
    name = os.fspath(path)

    def _first_line(err: BaseException) -> str:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__

    if kind == "aot_inductor":
        from torch._inductor import aoti_load_package

        try:
            runner = aoti_load_package(name)
        except Exception as err:
            raise FxReparamError(
                f"fxreparam.load: {name!r} is an AOTInductor package, but torch {torch.__version__} could not load "
                f"it ({_first_line(err)}): a package runs only with the torch version and the device type it was "
                "compiled for; compile it again here (fxreparam optimize ... --backend aot_inductor)") from err
        return GuardedRunner(runner, None)
    if kind == "program":
        try:
            program = torch.export.load(name)
        except Exception as err:
            raise FxReparamError(
                f"fxreparam.load: {name!r} is a torch.export program, but torch {torch.__version__} could not read "
                f"it ({_first_line(err)}): read it with the torch version that wrote it, or save it again with this "
                "one (fxreparam.save)") from err
        return guarded_module(program)
    raise FxReparamError(f"fxreparam.load cannot read {name!r}: {kind}. It loads torch.export programs "
                         "(fxreparam.save) and AOTInductor packages (fxreparam.deploy.aot_inductor).")


# ----------------------------------------------------------------------------------------------- ONNX


ONNX_SINGLE_FILE_BYTES = 2**31 * 9 // 10
"""Weights up to this size go inside the ``.onnx`` file itself; above, next to it in ``<path>.data``: ONNX files are
protobufs, which cannot exceed 2 GiB (the 10% margin leaves room for the graph)."""


def _weight_bytes(program: Any) -> int:
    """The bytes of every tensor an exported program stores (parameters, buffers, constants)."""
    tensors = [*program.state_dict.values(), *program.constants.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _written_buffers(program: Any) -> list[str]:
    """The buffers an exported program's forward writes: recorded as mutations (a functional program), or the
    target of an in-place op directly or through a view (``copy_``, ``add_``, ``buf[0] = v``)."""
    signature = program.graph_signature
    buffers = signature.inputs_to_buffers
    written = set(signature.buffers_to_mutate.values())
    for node in program.graph.nodes:
        if node.op != "call_function" or not getattr(getattr(node.target, "_schema", None), "is_mutable", False):
            continue
        base = node.args[0] if node.args else None
        while isinstance(base, fx.Node) and base.op == "call_function" and base.args and any(
                r.alias_info for r in getattr(getattr(base.target, "_schema", None), "returns", ())):
            base = base.args[0]  # a view: the write reaches the tensor it views
        if isinstance(base, fx.Node) and base.name in buffers:
            written.add(buffers[base.name])
    return sorted(written)


def _refuse_state(program: Any) -> None:
    """Raise :class:`FxReparamError` naming the buffers the program's forward writes: ONNX holds no state, so an
    ONNX model would start from the saved values on every call where the module advances them."""
    written = _written_buffers(program)
    if written:
        raise FxReparamError(f"export_onnx: the model writes buffer(s) {', '.join(map(repr, written))} in forward "
                             "(a counter, an observer, a cache), and an ONNX model cannot carry state: every call "
                             "would see the values saved at export. Remedy: save with fxreparam.save (a .pt2 "
                             "program keeps the writes), or remove the write from forward.")


def export_onnx(folded: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int | None = None
                ) -> Path:
    """Write ``folded`` as an ONNX file (the usual road to ``trtexec``) with torch's dynamo exporter.

    The dims the folded module keeps dynamic (its capture's: the batch by default, or ``dynamic_shapes``) are
    symbolic axes. One self-contained file where the weights fit (up to :data:`ONNX_SINGLE_FILE_BYTES`); above
    that, ONNX's 2 GiB limit puts the weights in a second file, ``<path>.data``, which must stay beside it.
    A model whose forward writes a buffer is refused (:class:`FxReparamError` naming it): ONNX holds no state.
    """
    try:
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise FxReparamError("export_onnx needs onnx and onnxscript: pip install 'fxreparam[onnx]'") from err
    args = _args(example_inputs)
    program = export_program(folded, args, {})
    _refuse_state(program)
    kwargs: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    if "external_data" in inspect.signature(torch.onnx.export).parameters:
        kwargs["external_data"] = _weight_bytes(program) > ONNX_SINGLE_FILE_BYTES
    torch.onnx.export(program, program.example_inputs[0], str(path), dynamo=True, verbose=False, **kwargs)
    return Path(path)


# ----------------------------------------------------------------------------------------------- AOTInductor


class GuardedRunner:
    """An AOTInductor runner that checks input shapes first: the compiled code itself does not, and would
    silently return the captured batch size for another one."""

    def __init__(self, runner: Any, guard: InputGuard | None) -> None:
        """Wrap ``runner``; ``guard`` None reads the check from the package's metadata."""
        self.runner = runner
        self.guard = guard if guard is not None else _guard_from_metadata(runner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Check the inputs' shapes (:class:`ShapeError` if not covered), then run the compiled model."""
        if self.guard is not None:
            self.guard(*pytree.tree_leaves((args, kwargs)))
        return self.runner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Everything else is the runner's (``loader``, ``get_metadata``, ...)."""
        if name in ("runner", "guard"):
            raise AttributeError(name)
        return getattr(self.runner, name)


def _guard_from_metadata(runner: Any) -> InputGuard | None:
    """The input check stored in a package's metadata by :func:`aot_inductor`, or None where there is none."""
    try:
        text = runner.get_metadata().get(_METADATA_KEY)
    except Exception:
        return None
    if not text:
        return None
    spec = json.loads(text)
    shapes = [tuple(s) if s is not None else None for s in spec["shapes"]]
    dynamic = [{int(d): (lo, hi) for d, (lo, hi) in dims.items()} for dims in spec["dynamic"]]
    return InputGuard(spec["names"], shapes, dynamic, None)


def _compile_package(compile_and_package: Callable[..., Any], program: Any, path: str | os.PathLike,
                     configs: dict[str, Any]) -> str:
    """``aoti_compile_and_package`` across torch versions (2.5 also takes the example inputs)."""
    takes_args = inspect.signature(compile_and_package).parameters.get("args")
    if takes_args is not None and takes_args.default is inspect.Parameter.empty:
        args, kwargs = program.example_inputs
        return compile_and_package(program, args, kwargs, package_path=str(path), inductor_configs=configs)
    return compile_and_package(program, package_path=str(path), inductor_configs=configs)


def aot_inductor(folded: nn.Module, example_inputs: Any, path: str | os.PathLike) -> tuple[Any, Path]:
    """Compile ``folded`` ahead of time into an AOTInductor package; returns the loaded runner and the path.

    The package keeps dynamic the dims the model does not pin (the batch at least); the runner checks
    every call's shapes against them and raises :class:`ShapeError` for one the package does not cover.
    """
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    program = export_program(folded, _args(example_inputs), {})
    guard = getattr(guarded_module(program), GUARD)
    spec = json.dumps({"names": guard.names, "shapes": guard.shapes,
                       "dynamic": [{str(d): r for d, r in dims.items()} for dims in guard.dynamic]})
    configs = {"aot_inductor.metadata": {_METADATA_KEY: spec}}
    try:
        written = _compile_package(aoti_compile_and_package, program, path, configs)
    except Exception as err:  # a torch without package metadata: compile without it, check from here only
        if "metadata" not in str(err):
            raise
        written = _compile_package(aoti_compile_and_package, program, path, {})
    return GuardedRunner(aoti_load_package(written), guard), Path(written)


# ----------------------------------------------------------------------------------------------- TensorRT


def tensorrt(folded: nn.Module, example_inputs: Any, *, precision: str = "fp32",
             shapes: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
             path: str | os.PathLike | None = None) -> nn.Module:
    """Build a TensorRT engine from ``folded`` with torch-tensorrt's dynamo frontend.

    ``precision``: ``"fp32"`` or ``"fp16"``; ``shapes``: one ``(min, opt, max)`` per input for dynamic
    shapes, else the example inputs' shapes. With ``path`` the result is saved there too
    (``torch_tensorrt.save``; reload with ``torch_tensorrt.load(path).module()``).
    Written against torch-tensorrt's documented API; not run on this project's machines.
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
