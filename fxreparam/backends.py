"""Hand the folded graph to a compiler: the ``"fxreparam"`` torch.compile backend and ``optimize(backend=...)``.

``torch.compile(model, backend="fxreparam")`` runs the pass pipeline on every graph Dynamo
captures (graph breaks included, so a model no tracer takes whole still folds region by region)
and hands the result to an inner compiler, Inductor by default. Dynamo passes parameters and
buffers as graph inputs; the backend *freezes* them, as Inductor's ``freezing`` does: their values
are read once, at compile time, and the compiled model is for inference. Change a weight and
compile again (``torch._dynamo.reset()``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .errors import FxReparamError
from .finalize import finalize
from .manager import run_passes
from .ops import _clean_path
from .registry import list_passes
from .report import Report, count_ops
from .verify import TOLERANCE, compare, float64_copy

__all__ = ["INNER_COMPILERS", "compile_with", "freeze", "fxreparam_backend", "region_reports"]

log = logging.getLogger("fxreparam")

INNER_COMPILERS = ("inductor", "eager", "tensorrt")
_REPORTS: list[Report] = []


def region_reports() -> list[Report]:
    """The reports of the graphs the ``"fxreparam"`` backend has compiled in this process, oldest first."""
    return list(_REPORTS)


def _stored_tensor(node: fx.Node, value: Any) -> str | None:
    """The model path of a placeholder that Dynamo lifted from a parameter or buffer, else ``None``."""
    if not isinstance(value, torch.Tensor):
        return None
    arg = node.meta.get("grapharg")
    name = arg.source.name() if arg is not None and callable(getattr(arg.source, "name", None)) else (
        getattr(getattr(arg, "source", None), "name", None))
    if isinstance(name, str) and ("._parameters[" in name or "._buffers[" in name):
        return _clean_path(name)
    if isinstance(value, nn.Parameter):
        return node.name
    return None


def freeze(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    """Turn the placeholders that hold parameters and buffers into stored constants.

    Returns the frozen graph module and the positions of the inputs it still takes.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    keep: list[int] = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        path = _stored_tensor(node, value)
        if path is None:
            keep.append(i)
            continue
        name = "".join(c if c.isalnum() else "_" for c in path)
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, value.detach())
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(name)
        const.meta.update(node.meta)
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, keep


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


def fxreparam_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None,
                      mode: str | None = None) -> Callable[..., Any]:
    """The ``"fxreparam"`` torch.compile backend: freeze, fold, verify, then compile with ``options["inner"]``.

    Options: ``inner`` (``"inductor"``, ``"eager"``, ``"tensorrt"``), ``verify`` (default ``True``).
    """
    options = dict(options or {})
    inner = options.pop("inner", "inductor")
    verify = options.pop("verify", True)
    if options:
        raise ValueError(f"unknown fxreparam backend options {sorted(options)}; known: inner, verify")
    frozen, keep = freeze(copy.deepcopy(gm), example_inputs)  # the original stays for verification
    before = count_ops(frozen)
    passlog = run_passes(frozen, list_passes())
    folded = finalize(frozen, class_name="FoldedRegion")
    runtime_inputs = [example_inputs[i] for i in keep]
    verification = None
    if verify and all(isinstance(x, torch.Tensor) for x in runtime_inputs):
        verification = _verify_region(gm, example_inputs, keep, folded)
    report = Report(model="torch.compile region", capture="Dynamo", capture_seconds=0.0, optimize_seconds=0.0,
                    passes=list(passlog.stats.values()), refusals=passlog.refusals, before=before,
                    after=count_ops(folded), verification=verification,
                    verification_note="skipped" if verification is None else "", rounds=passlog.rounds)
    _REPORTS.append(report)
    log.info("fxreparam backend: region of %d ops folded to %d convs, %d batch norms; inner compiler %s",
             sum(before.as_dict().values()) - before.parameters, report.after.conv, report.after.batch_norm, inner)
    compiled = compile_with(inner, folded, runtime_inputs)

    def run(*args: Any) -> Any:
        return compiled(*[args[i] for i in keep])

    return run


def _verify_region(original: fx.GraphModule, example_inputs: Sequence[Any], keep: list[int],
                   folded: fx.GraphModule):
    """Compare the folded region with the original graph in float64; raise on a mismatch."""
    from .errors import VerificationError

    frozen_values = {i: x for i, x in enumerate(example_inputs) if i not in keep}
    original64 = float64_copy(original)
    frozen64 = {i: x.detach().double() if x.is_floating_point() else x for i, x in frozen_values.items()}

    def reference(*args: Any) -> Any:
        it = iter(args)
        return original64(*[frozen64[i] if i in frozen64 else next(it) for i in range(len(example_inputs))])

    dtype = next((x.dtype for x in example_inputs if isinstance(x, torch.Tensor) and x.is_floating_point()),
                 torch.float32)
    result = compare(reference, float64_copy(folded), tuple(example_inputs[i] for i in keep), {},
                     TOLERANCE.get(dtype, 1e-4))
    if not result.ok:
        raise VerificationError(f"the fxreparam backend changed a graph's outputs: {result}", pass_name=None,
                                error=result.error, tolerance=result.tolerance)
    return result
