"""``fxreparam.optimize``: capture, rewrite to a fixpoint, finalize, verify, report."""

from __future__ import annotations

import functools
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import deploy
from .capture import Captured, copy_model
from .capture import capture as capture_graph
from .core import Outcome, Source, fold
from .errors import CaptureInputError, VerificationError
from .meta import export_value
from .registry import Pass, list_passes, resolve
from .verify import Reference, fresh_copies, state_kept

__all__ = ["optimize"]

log = logging.getLogger("fxreparam")


def _as_args(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _select(passes: str | Pass | Sequence[str | Pass] | None, skip: str | Iterable[str] | None) -> list[Pass]:
    """The passes to run, in pipeline order: ``passes`` (default all) less ``skip``; unknown names raise KeyError."""
    chosen = list_passes() if passes is None else resolve(passes)
    skipped = {p.name for p in resolve(skip)} if skip else set()
    return [p for p in chosen if p.name not in skipped]


def _check_call(model: Any, args: tuple | None, kwargs: dict[str, Any]) -> None:
    """Refuse what cannot be optimized before any work: not a module, or weights that hold no values."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxreparam.optimize takes a torch.nn.Module, not {type(model).__name__}: wrap a function "
                        "in an nn.Module whose forward calls it")
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        more = f" and {len(on_meta) - 3} more" if len(on_meta) > 3 else ""
        raise ValueError(f"{type(model).__name__} has parameters or buffers ({', '.join(on_meta[:3])}{more}) that hold "
                         "no values, on the meta device: load real weights first (model.to_empty(device='cpu') then "
                         "load_state_dict, or load_state_dict(..., assign=True))")
    inputs = pytree.tree_leaves((args, kwargs))
    if any(isinstance(x, torch.Tensor) and x.device.type == "meta" for x in inputs):
        raise ValueError("an example input is on the meta device, which holds no values: give real tensors")


def _float64_twin(model: nn.Module) -> Callable[..., Any] | None:
    """``model`` run with float64 copies of its floating parameters and buffers, made on the first call (no copy
    of the module itself; most verifications never need them), the buffers afresh on every call (a forward that
    writes them must start from the model's state each time); None where the model is float64 already."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    if all(t.dtype == torch.float64 or not t.is_floating_point() for t in tensors.values()):
        return None

    @functools.cache
    def as64() -> dict[str, torch.Tensor]:
        return {name: t.detach().double() if t.is_floating_point() else t for name, t in tensors.items()}

    buffers = {name for name, _ in model.named_buffers()}

    def run(*args: Any, **kwargs: Any) -> Any:
        state = {name: t.clone() if name in buffers else t for name, t in as64().items()}
        return torch.func.functional_call(model, state, args, kwargs)

    return run


def _dynamic_dims(captured: Captured, args: tuple, kwargs: dict[str, Any]) -> list[Any] | None:
    """Per flattened example input, the dims the capture left dynamic: as capture recorded them (dim -> sizes),
    else read from the graph's placeholders (symbolic sizes)."""
    leaves = pytree.tree_leaves((args, kwargs))
    recorded = getattr(captured, "dynamic_dims", None)
    if recorded and len(recorded) == len(leaves):
        return list(recorded)
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(leaves):
        return None
    return [tuple(d for d, n in enumerate(getattr(export_value(node), "shape", ())) if isinstance(n, torch.SymInt))
            for node in placeholders]


class _Progress:
    """With ``on``: the ``fxreparam`` logger's INFO lines (each step and its time) go to stderr, and the passes
    show a tqdm bar per round; without, nothing is printed (library convention)."""

    def __init__(self, on: bool) -> None:
        self.on, self.bar, self.round = on, None, 0

    def __enter__(self) -> _Progress:
        if self.on:
            self.handler = logging.StreamHandler(sys.stderr)
            self.handler.setFormatter(logging.Formatter("fxreparam: %(message)s"))
            self.level = log.level
            log.addHandler(self.handler)
            log.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        if self.on:
            log.removeHandler(self.handler)
            log.setLevel(self.level)

    def on_pass(self, total: int) -> Callable[[int, str], None] | None:
        """The ``run_passes`` callback that advances a bar of ``total`` passes per round (None when off)."""
        if not self.on:
            return None
        from tqdm import tqdm

        def step(round_: int, name: str) -> None:
            if self.bar is None or self.round != round_:
                self.close()
                self.round = round_
                self.bar = tqdm(total=total, desc=f"fxreparam: passes, round {round_}", unit="pass", leave=False,
                                file=sys.stderr)
            else:
                self.bar.update()
            self.bar.set_postfix_str(name)

        return step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def optimize(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    passes: str | Pass | Sequence[str | Pass] | None = None,
    skip: str | Iterable[str] | None = (),
    verify: bool = True,
    backend: str | None = None,
    example_kwargs: dict[str, Any] | None = None,
    capture: str = "auto",
    tolerance: float | None = None,
    backend_options: dict[str, Any] | None = None,
    progress: bool = False,
    dynamic_shapes: Any = None,
) -> Any:
    """A new module computing ``model``'s inference (eval-mode) function with its structure folded.

    Args:
        model: the ``nn.Module`` to fold; never modified, nor its state advanced (a model in training mode gets
            a warning and is folded as in eval mode). The result starts in the model's state (buffers its forward
            writes included) and advances it as the model would: verification runs on saved and restored state.
        example_inputs: a tensor or a tuple of positional inputs. With them the model is captured with
            ``torch.export`` and the result is verified; without them it is traced with ``symbolic_trace``
            and not verified.
        passes: the passes to run, by name, alias or :class:`Pass` (one, or a list); default all of them.
        skip: passes not to run (one name or a list); an unknown name raises ``KeyError``.
        verify: compare the result with the original (see :mod:`fxreparam.verify`): per output channel,
            against a float64 run of the original, on the examples, one random input set and, where the
            capture is dynamic, another batch size.
        backend: ``None``/``"eager"`` returns the folded module; ``"inductor"`` that module under
            ``torch.compile``, weights frozen into Inductor's constants under ``no_grad``; ``"aot_inductor"``
            a ``(runner, package_path)`` pair; ``"tensorrt"`` a TensorRT module (see :func:`fxreparam.deploy.deploy`).
        example_kwargs: keyword inputs of ``forward``.
        capture: ``"auto"``, ``"export"`` or ``"symbolic_trace"`` (fastest on very deep models).
        tolerance: the relative error per channel always allowed (default by dtype,
            :data:`fxreparam.verify.FLOOR`); the model's own rounding can raise it channel by channel.
        backend_options: options of ``backend`` (e.g. ``{"path": ...}``); unknown keys raise ``ValueError``.
        progress: print each step (capture, passes, verification) and its time to stderr, through the
            ``"fxreparam"`` logger at INFO level (which can also be configured directly).
        dynamic_shapes: the dims to keep dynamic, in ``torch.export.export``'s ``dynamic_shapes`` format (per input,
            ``{dim: torch.export.Dim(...)}``); default: the batch dim where the model allows it. Verification
            tries another size in each dynamic dim.

    Returns:
        The folded module (or what ``backend`` made of it); ``fxreparam.report(result)`` tells what was done.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: weights or inputs on the meta device, an unknown ``backend``, ``capture`` or backend option;
            a :class:`CaptureInputError` for an example in a dtype the model does not run on.
        KeyError: an unknown pass name in ``passes`` or ``skip``.
        CaptureError: neither ``torch.export`` nor ``symbolic_trace`` takes the model.
        VerificationError: the result computes something other than the model (``.pass_name`` names the first
            pass after which the outputs diverge, ``"capture"`` where the captured graph already did), or it could
            not be verified (``.pass_name`` is None).
    """
    with _Progress(progress) as shown:
        return _optimize(model, example_inputs, passes, skip, verify, backend, example_kwargs, capture, tolerance,
                         backend_options, shown, dynamic_shapes=dynamic_shapes)


def _optimize(model: nn.Module, example_inputs: Any, passes: Any, skip: Any, verify: bool, backend: str | None,
              example_kwargs: dict[str, Any] | None, capture: str, tolerance: float | None,
              backend_options: dict[str, Any] | None, shown: _Progress, double: bool = True,
              dynamic_shapes: Any = None) -> Any:
    """:func:`optimize`'s body, after its arguments. ``double=False``: a batch-1 example is captured as given
    (the retry where the batch-of-two capture turns out not to compute the model at batch size 1)."""
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})
    _check_call(model, args, kwargs)
    if backend not in deploy.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {deploy.BACKENDS}")
    selected = _select(passes, skip)
    if model.training:
        warnings.warn(f"{type(model).__name__} is in training mode: fxreparam folds its inference (eval) function; "
                      "the model itself is left in training mode", stacklevel=3)
    start = time.perf_counter()
    work = copy_model(model).eval()
    _check_dtypes(work, args, kwargs)
    log.info("capturing %s (%s) ...", type(model).__name__, capture)
    captured = _capture(work, args, kwargs, capture, double, verify, dynamic_shapes)
    log.info("captured %d nodes with %s in %.2f s", len(captured.gm.graph.nodes), captured.method, captured.seconds)

    reference, note, verify_seconds = None, "skipped (verify=False)", 0.0
    if verify and args is None:
        note = "skipped: no example inputs to run the model on"
    elif verify:  # the original's outputs, before any pass runs (a pass must not be able to change them)
        tick = time.perf_counter()
        reference = Reference(work, args, kwargs, original64=_float64_twin(work),
                              dynamic=_dynamic_dims(captured, args, kwargs), floor=tolerance,
                              covers=getattr(captured, "check_inputs", None))
        verify_seconds = time.perf_counter() - tick

    def fresh() -> fx.GraphModule:  # the same capture again, for the culprit search
        return _capture(copy_model(model).eval(), args, kwargs, captured.method_key, double, True,
                        dynamic_shapes).gm

    source = Source(captured.gm, type(model).__name__, captured.method, captured.seconds, fresh, _notes(args))
    outcome = fold(source, selected, class_name=f"Folded{type(model).__name__}",
                   check=reference.check if reference is not None else None,
                   verification_note=note, on_pass=shown.on_pass(len(selected)), verify_seconds=verify_seconds)
    shown.close()
    log.info("ran %d passes to a fixpoint in %d rounds, finalized and verified: %d rewrites; %s", len(selected),
             outcome.passlog.rounds, sum(s.rewrites for s in outcome.passlog.stats.values()),
             outcome.verification if outcome.verification is not None else note)
    if outcome.failed:
        if outcome.culprit == "capture" and captured.doubled:
            log.info("the batch-of-two capture does not compute the model on the example: capturing it as given")
            return _optimize(model, example_inputs, passes, skip, verify, backend, example_kwargs, capture,
                             tolerance, backend_options, shown, double=False, dynamic_shapes=dynamic_shapes)
        raise _failure(model, outcome, captured.method)
    folded = outcome.module
    outcome.report.optimize_seconds = time.perf_counter() - start - captured.seconds
    folded.fxreparam_report = outcome.report
    if backend not in (None, "eager"):
        log.info("handing the folded module to %s ...", backend)
    return deploy.deploy(folded, backend, args, dict(backend_options or {}))


def _capture(work: nn.Module, args: tuple | None, kwargs: dict[str, Any], method: str, double: bool, verify: bool,
             dynamic_shapes: Any) -> Captured:
    """Capture ``work`` leaving its state as it was (the capture's own check runs it). Verification runs the
    example anyway, so the capture's check of a batch-of-two graph is left to it."""
    extra = {} if dynamic_shapes is None else {"dynamic_shapes": dynamic_shapes}
    with state_kept(work):
        return capture_graph(work, args, kwargs, method, double=double, check=not verify, **extra)


def _check_dtypes(work: nn.Module, args: tuple | None, kwargs: dict[str, Any]) -> None:
    """Refuse, before any work, a floating example in a dtype the model's weights are not in where the model does
    not run on it (a float64 example for a float32 model), with the remedy; the model's state is left as it was."""
    weights = {t.dtype for t in [*work.parameters(), *work.buffers()] if t.is_floating_point()}
    leaves = pytree.tree_leaves((args, kwargs))
    odd = [(i, x) for i, x in enumerate(leaves)
           if isinstance(x, torch.Tensor) and x.is_floating_point() and weights and x.dtype not in weights]
    if not odd:
        return
    try:
        with torch.no_grad(), state_kept(work):
            work(*fresh_copies(args or ()), **fresh_copies(kwargs))
    except Exception as err:
        i, x = odd[0]
        dtype = str(next(iter(weights))).removeprefix("torch.")
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise CaptureInputError(
            f"example input {i} is a {x.dtype} tensor, but {type(work).__name__}'s weights are "
            f"{', '.join(sorted(str(w) for w in weights))} and it does not run on it ({type(err).__name__}: {first}). "
            f"Remedy: pass the example in the model's dtype (x.to(torch.{dtype})), or convert the model first "
            f"(model.to({x.dtype}))") from err


def _failure(model: nn.Module, outcome: Outcome, method: str) -> VerificationError:
    """The :class:`VerificationError` for a fold that could not be verified or changed the outputs, naming the
    first pass after which they diverge (``"capture"`` where the captured graph itself does not compute them)."""
    verification, culprit, step = outcome.verification, outcome.culprit, outcome.culprit_check
    name = type(model).__name__
    if not verification.checked:
        return VerificationError(
            f"could not verify the optimized {name}: {verification.note}. Give example inputs the model computes "
            "something on, or pass verify=False to accept the result unverified.",
            pass_name=None, error=verification.error, tolerance=verification.tolerance, verification=verification)
    if culprit == "capture":
        return VerificationError(
            f"the captured graph ({method}) computes something other than {name} before any pass ran: {step}. "
            "Nothing was returned; run again with capture='symbolic_trace' (or 'export'), and please report the "
            "model.", pass_name=culprit, error=step.error, tolerance=step.tolerance, verification=step)
    remedy = (f"run again with skip=[{culprit!r}] to optimize without it" if culprit != "finalize" else
              "every pass kept the outputs, so building the final module changed them")
    return VerificationError(
        f"{'pass ' + repr(culprit) if culprit != 'finalize' else 'finalize'} changed {name}'s outputs: {step}. "
        f"Nothing was returned; {remedy}, and please report the model.",
        pass_name=culprit, error=step.error, tolerance=step.tolerance, verification=step)


def _notes(args: tuple | None) -> list[str]:
    """What the report should say beyond its tables: a capture without inputs."""
    if args is not None:
        return []
    return ["no example inputs: captured with symbolic_trace, which knows no shapes, leaves in-place writes and "
            "hooked modules alone and cannot verify the result; optimize(model, example_inputs) folds more (a "
            "RepVGG block's identity BN, for one) and verifies it"]
