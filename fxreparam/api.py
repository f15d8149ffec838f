"""``fxreparam.optimize``: capture, rewrite to a fixpoint, finalize, verify, report."""

from __future__ import annotations

import copy
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
from .capture import Captured
from .capture import capture as capture_graph
from .errors import VerificationError
from .finalize import finalize
from .pipeline import replay, run_passes
from .registry import Pass, list_passes, resolve
from .report import Report, count_ops
from .verify import Reference, Verification

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
    of the module itself; most verifications never need them); None where the model is float64 already."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    if all(t.dtype == torch.float64 or not t.is_floating_point() for t in tensors.values()):
        return None

    @functools.cache
    def as64() -> dict[str, torch.Tensor]:
        return {name: t.detach().double() if t.is_floating_point() else t for name, t in tensors.items()}

    return lambda *args, **kwargs: torch.func.functional_call(model, as64(), args, kwargs)


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
    return [tuple(d for d, n in enumerate(getattr(node.meta.get("val"), "shape", ())) if isinstance(n, torch.SymInt))
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
) -> Any:
    """A new module computing ``model``'s inference (eval-mode) function with its structure folded.

    Args:
        model: the ``nn.Module`` to fold; never modified (a model in training mode gets a warning and is
            folded as in eval mode).
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

    Returns:
        The folded module (or what ``backend`` made of it); ``fxreparam.report(result)`` tells what was done.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: weights or inputs on the meta device, an unknown ``backend``, ``capture`` or backend option.
        KeyError: an unknown pass name in ``passes`` or ``skip``.
        CaptureError: neither ``torch.export`` nor ``symbolic_trace`` takes the model.
        VerificationError: the result computes something other than the model (``.pass_name`` names the first
            pass after which the outputs diverge, ``"capture"`` where the captured graph already did), or it could
            not be verified (``.pass_name`` is None).
    """
    with _Progress(progress) as shown:
        return _optimize(model, example_inputs, passes, skip, verify, backend, example_kwargs, capture, tolerance,
                         backend_options, shown)


def _optimize(model: nn.Module, example_inputs: Any, passes: Any, skip: Any, verify: bool, backend: str | None,
              example_kwargs: dict[str, Any] | None, capture: str, tolerance: float | None,
              backend_options: dict[str, Any] | None, shown: _Progress, double: bool = True) -> Any:
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
    work = copy.deepcopy(model).eval()
    log.info("capturing %s (%s) ...", type(model).__name__, capture)
    # Verification runs the example anyway: the capture's own check of a batch-of-two graph is left to it.
    captured = capture_graph(work, args, kwargs, capture, double=double, check=not verify)
    gm = captured.gm
    log.info("captured %d nodes with %s in %.2f s", len(gm.graph.nodes), captured.method, captured.seconds)

    reference, note, verify_seconds = None, "skipped (verify=False)", 0.0
    if verify and args is None:
        note = "skipped: no example inputs to run the model on"
    elif verify:  # the original's outputs, before any pass runs (a pass must not be able to change them)
        tick = time.perf_counter()
        reference = Reference(work, args, kwargs, original64=_float64_twin(work),
                              dynamic=_dynamic_dims(captured, args, kwargs), floor=tolerance,
                              covers=getattr(captured, "check_inputs", None))
        verify_seconds = time.perf_counter() - tick

    before = count_ops(gm)
    tick = time.perf_counter()
    passlog = run_passes(gm, selected, on_pass=shown.on_pass(len(selected)))
    shown.close()
    folded = finalize(gm, class_name=f"Folded{type(model).__name__}")
    log.info("ran %d passes to a fixpoint in %d rounds and finalized in %.2f s: %d rewrites", len(selected),
             passlog.rounds, time.perf_counter() - tick, sum(s.rewrites for s in passlog.stats.values()))

    verification: Verification | None = None
    if reference is not None:
        tick = time.perf_counter()
        verification = reference.check(folded)
        verify_seconds += time.perf_counter() - tick
        log.info("verified against the original in %.2f s: %s", verify_seconds, verification)
        if not verification.checked:
            raise VerificationError(
                f"could not verify the optimized {type(model).__name__}: {verification.note}. Give example inputs "
                "the model computes something on, or pass verify=False to accept the result unverified.",
                pass_name=None, error=verification.error, tolerance=verification.tolerance,
                verification=verification)
        if not verification.ok:
            by_name = {p.name: p for p in selected}
            log.info("replaying the passes one by one to find the one that changed the outputs ...")
            error = _blame(model, args, kwargs, reference, [by_name[n] for n in passlog.schedule], verification,
                           captured.method_key, double)
            if error.pass_name == "capture" and captured.doubled:
                log.info("the batch-of-two capture does not compute the model on the example: capturing it as given")
                return _optimize(model, example_inputs, passes, skip, verify, backend, example_kwargs, capture,
                                 tolerance, backend_options, shown, double=False)
            raise error
    folded.fxreparam_report = Report(
        model=type(model).__name__, capture=captured.method, capture_seconds=captured.seconds,
        optimize_seconds=time.perf_counter() - start - captured.seconds, passes=list(passlog.stats.values()),
        refusals=passlog.refusals, before=before, after=count_ops(folded), verification=verification,
        verification_note=note, rounds=passlog.rounds, verify_seconds=verify_seconds,
        notes=_notes(args, passlog))
    if backend not in (None, "eager"):
        log.info("handing the folded module to %s ...", backend)
    return deploy.deploy(folded, backend, args, dict(backend_options or {}))


def _notes(args: tuple | None, passlog: Any) -> list[str]:
    """What the report should say beyond its tables: a capture without inputs, passes that did not settle."""
    notes = []
    if args is None:
        notes.append("no example inputs: captured with symbolic_trace, which knows no shapes, leaves in-place writes "
                     "and hooked modules alone and cannot verify the result; optimize(model, example_inputs) folds "
                     "more (a RepVGG block's identity BN, for one) and verifies it")
    if passlog.unsettled:
        notes.append(f"no fixpoint after {passlog.rounds} rounds: {', '.join(passlog.unsettled)} still rewrote in the "
                     "last one (the result is verified all the same; please report the model)")
    return notes


def blame(fresh: Callable[[], fx.GraphModule], reference: Reference, schedule: list[Pass],
          failed: Verification) -> tuple[str, Verification]:
    """Replay ``schedule`` one pass at a time on a ``fresh()`` capture; the first pass after which
    ``reference`` no longer accepts the graph, and that check ("capture" where the graph differs before any pass,
    "finalize" if every pass was fine)."""
    gm = fresh()
    step = reference.check(gm)
    if not step.ok:
        return "capture", step
    for p in replay(gm, schedule):
        step = reference.check(gm)
        if not step.ok:
            return p.name, step
    return "finalize", failed


def _blame(model: nn.Module, args: tuple, kwargs: dict, reference: Reference, schedule: list[Pass],
           failed: Verification, method: str, double: bool = True) -> VerificationError:
    """The :class:`VerificationError` naming the first pass after which the outputs diverge (``"capture"``
    where the captured graph itself does not compute the model)."""
    def fresh() -> fx.GraphModule:  # the same capture again, unchecked as the first was
        return capture_graph(copy.deepcopy(model).eval(), args, kwargs, method, double=double, check=False).gm

    culprit, step = blame(fresh, reference, schedule, failed)
    if culprit == "capture":
        return VerificationError(
            f"the captured graph ({method}) computes something other than {type(model).__name__} before any pass ran: "
            f"{step}. Nothing was returned; run again with capture='symbolic_trace' (or 'export'), and please "
            "report the model.", pass_name=culprit, error=step.error, tolerance=step.tolerance, verification=step)
    remedy = (f"run again with skip=[{culprit!r}] to optimize without it" if culprit != "finalize" else
              "every pass kept the outputs, so building the final module changed them")
    return VerificationError(
        f"{'pass ' + repr(culprit) if culprit != 'finalize' else 'finalize'} changed {type(model).__name__}'s "
        f"outputs: {step}. Nothing was returned; {remedy}, and please report the model.",
        pass_name=culprit, error=step.error, tolerance=step.tolerance, verification=step)
