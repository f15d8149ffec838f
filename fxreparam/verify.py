"""Verification: the optimized model must compute what the original computes, channel by channel.

The original runs once in its own dtype and once in float64 on a few input sets (the example
inputs made non-empty, one fresh random set of the same shapes, and one of another batch size
where the capture is dynamic); :class:`Reference` keeps those outputs. Each candidate then runs
in its own dtype and is compared with the float64 outputs per output channel (dim 1; per element
against the output's scale for outputs of fewer than two dims). A channel may be off by
``max(floor[dtype], K x the original's own float-vs-float64 error on that channel)``: an exact fold
of an ill-conditioned model passes, a wrong channel next to a 1e4-times larger one does not.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import VerificationError
from .trees import fresh_copies

__all__ = ["FLOOR", "QUICK", "K", "Reference", "Verification", "fresh_copies", "relative_error", "state_kept", "verify"]

K = 16
"""A fold may round K times worse than the original model's own rounding (measured per channel against float64):
folded kernels are rounded once to the model's dtype and sum their terms in another order, which costs a few times
the original's error; a wrong fold is off by orders of magnitude more."""

FLOOR = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
"""Relative error per channel always allowed for an output of each dtype (~800 ulps of float32): where the original
happens to compute a channel exactly (an identity branch), its own error says nothing about the fold's rounding."""

_OTHER_FLOOR = 1e-1  # float8 and other floating dtypes

Inputs = tuple[tuple, dict]


@dataclass
class Verification:
    """The outcome of a comparison at its worst channel: its relative error and the error it was allowed.

    ``checked`` is False when no comparison could be made (``note`` says why): such a verification is never ok.
    ``output``/``channel`` locate the worst channel (the one with the highest error-to-allowance ratio);
    ``basis`` says where its allowance came from; ``ill_conditioned`` counts channels whose own float rounding
    error exceeded 1 % (the check is weak there, and the report says so).
    """

    error: float
    tolerance: float
    trials: int
    shapes: int = 1
    checked: bool = True
    output: str = ""
    channel: int | None = None
    basis: str = ""
    elements: int = 0
    ill_conditioned: int = 0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.checked and self.elements > 0 and self.error <= self.tolerance

    def __str__(self) -> str:
        if not self.checked:
            return f"NOT VERIFIED: {self.note}"
        inputs = f"{self.trials} inputs, {self.shapes} shape{'s' if self.shapes != 1 else ''}"
        if math.isinf(self.error) and self.note:
            return f"FAILED: {self.note}; {inputs}"
        where = "worst channel" if self.ok else f"output {self.output or '0'}" + (
            f" channel {self.channel}" if self.channel is not None else "")
        text = (f"{'ok' if self.ok else 'FAILED'}: {where} relative error {self.error:.1e} "
                f"(allowed {self.tolerance:.1e}: {self.basis}), {inputs}")
        if self.ill_conditioned:
            text += (f"; {self.ill_conditioned} ill-conditioned channels (the model's own rounding error there "
                     "exceeds 1 %: the check is weak there)")
        return text + (f"; {self.note}" if self.note else "")


def not_checked(note: str) -> Verification:
    """A verification that could not be made, and why: never ok."""
    return Verification(math.nan, math.nan, 0, 0, checked=False, note=note)


def relative_error(reference: Any, candidate: Any) -> float:
    """Worst ``||c - r|| / ||r||`` over the floating tensors of two output trees (one norm per tensor).

    A quick measure for tests and benchmarks; :class:`Reference` is the check ``optimize`` makes.
    """
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    cand_leaves, cand_spec = pytree.tree_flatten(candidate)
    if ref_spec != cand_spec:
        return float("inf")
    worst = 0.0
    for r, c in zip(ref_leaves, cand_leaves):
        if not isinstance(r, torch.Tensor) or not r.is_floating_point():
            if isinstance(r, torch.Tensor) and not torch.equal(r, c):
                return float("inf")
            continue
        if r.shape != c.shape:
            return float("inf")
        r, c = r.double(), c.double()
        finite = torch.isfinite(r)
        if not torch.equal(finite, torch.isfinite(c)):
            return float("inf")  # inf or nan where the other is finite
        if not torch.equal(torch.nan_to_num(r[~finite]), torch.nan_to_num(c[~finite])):
            return float("inf")  # non-finite in the same places, but not the same ones (nan, +inf, -inf)
        r, c = r[finite], c[finite]
        diff = torch.linalg.vector_norm(c - r).item()
        scale = torch.linalg.vector_norm(r).item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


# ----------------------------------------------------------------------------------------------- trial inputs


def _random_like(x: torch.Tensor, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Fresh standard-normal values for a floating input; integer and bool inputs keep the example's values."""
    if x.is_floating_point() or x.is_complex():
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(x.dtype).to(x.device)
    if x.numel() == 0:
        return torch.zeros(tuple(shape), dtype=x.dtype, device=x.device)
    out = x
    for d, n in enumerate(shape):  # tile the example's own values: indices and masks stay valid
        if out.shape[d] != n:
            out = out.index_select(d, torch.arange(n, device=x.device) % out.shape[d])
    return out


Dynamic = Sequence[Sequence[int] | Mapping[int, tuple[int, int | None]]]
"""Per flattened input, the dims the capture left dynamic: a list of dims, or dim -> (min, max) sizes."""


def _resize(n: int, bounds: tuple[int, int | None]) -> int:
    """Another size for a dynamic dim, within ``bounds``: the smallest of 2 and 3 that is not ``n`` (small sizes
    keep the check cheap; size 1 is avoided, since export treats it specially), else what the bounds allow."""
    low, high = bounds
    for want in (2, 3):
        if want != n and want >= low and (high is None or want <= high):
            return want
    return n


def trial_inputs(args: tuple, kwargs: dict, dynamic: Dynamic | None = None, seed: int = 0
                 ) -> tuple[list[Inputs], int, list[bool], str]:
    """The input sets a verification runs: the examples, and one random set, at another size in every dim the
    capture left dynamic.

    ``dynamic`` (see :data:`Dynamic`) says which dims the capture left dynamic. A zero-size example dim becomes
    2 in the random set, so values are compared on non-empty tensors; where the capture did not make that dim
    dynamic the set is *speculative* (the optimized module need not run there). Returns the sets, their number
    of distinct shapes, which sets are speculative, and a note.
    """
    leaves, spec = pytree.tree_flatten((args, kwargs))
    dims: list[dict[int, tuple[int, int | None]]] = [
        dict(d) if isinstance(d, Mapping) else {i: (0, None) for i in d} for d in (dynamic or [])]
    dims += [{}] * (len(leaves) - len(dims))
    generator = torch.Generator().manual_seed(seed)
    example = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in leaves]
    pinned = any(n == 0 and d not in dims[i] for i, s in enumerate(example) if s for d, n in enumerate(s))
    other = [None if s is None else tuple(_resize(n, dims[i][d]) if d in dims[i] else 2 if n == 0 else n
                                          for d, n in enumerate(s)) for i, s in enumerate(example)]
    values = [x if s is None else _random_like(x, s, generator) for x, s in zip(leaves, other)]
    sets, speculative = [(tuple(args), dict(kwargs)), pytree.tree_unflatten(values, spec)], [False, pinned]
    note = ""
    if any(n == 0 for s in example if s for n in s):
        note = ("the example has a zero-size dim: values were compared at size 2 there"
                + (" (the capture pinned that dim; the optimized module was run there anyway)" if pinned else ""))
    return sets, len({tuple(example), tuple(other)}), speculative, note


# ----------------------------------------------------------------------------------------------- comparison


def _floor(dtype: torch.dtype) -> float:
    return FLOOR.get(dtype, _OTHER_FLOOR)


@contextlib.contextmanager
def state_kept(*modules: Any) -> Iterator[None]:
    """Run a block that may write the buffers of ``modules`` (in place, or by rebinding the attribute) and leave
    each as it was, the same tensor holding the same values: verification runs a model whose state is the user's.
    Parameters are rebound if the block rebinds them (their values are not copied: forwards do not write them);
    anything that is not an ``nn.Module`` is left alone."""
    saved: list[tuple[dict, str, torch.Tensor, torch.Tensor | None]] = []
    for mod in (m for m in modules if isinstance(m, nn.Module)):
        for sub in mod.modules():
            saved += [(sub._buffers, n, t, t.detach().clone()) for n, t in sub._buffers.items() if t is not None]
            saved += [(sub._parameters, n, t, None) for n, t in sub._parameters.items() if t is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for table, name, tensor, values in saved:
                table[name] = tensor
                if values is not None:
                    tensor.copy_(values)


def _float64(x: Any) -> Any:
    return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _same_nonfinite(o: torch.Tensor, c: torch.Tensor) -> bool:
    """inf and nan in the same places with the same values (nan matches nan; nan does not match +-inf)."""
    bad = ~torch.isfinite(o)
    if not torch.equal(bad, ~torch.isfinite(c)):
        return False
    o, c = o[bad], c[bad]
    return torch.equal(o.isnan(), c.isnan()) and torch.equal(torch.nan_to_num(o, nan=0.0), torch.nan_to_num(c, nan=0.0))


def _channels(x: torch.Tensor) -> torch.Tensor:
    """``x`` as rows of one channel each: dim 1 for tensors of two or more dims, one row per element otherwise."""
    return x.movedim(1, 0).reshape(x.shape[1], -1) if x.dim() >= 2 else x.reshape(-1, 1)


@dataclass
class _Worst:
    ratio: float = -1.0
    error: float = 0.0
    allowed: float = 0.0
    output: str = ""
    channel: int | None = None
    basis: str = ""


@dataclass
class _Sums:
    """Per-channel sums of squares of one output, pooled over the input sets (few elements per channel, such as
    the logits of a batch of 2, would make a per-set ratio of two errors noisy)."""

    floor: float
    dtype: torch.dtype
    per_element: bool
    diff: torch.Tensor
    own: torch.Tensor
    ref: torch.Tensor
    count: torch.Tensor

    def add(self, diff: torch.Tensor, own: torch.Tensor, ref: torch.Tensor, count: torch.Tensor) -> None:
        self.diff, self.own, self.ref, self.count = self.diff + diff, self.own + own, self.ref + ref, self.count + count


def _accumulate(orig: torch.Tensor, ref: torch.Tensor, cand: torch.Tensor, floor: float, name: str,
                sums: dict[tuple, _Sums]) -> str:
    """Add one floating output's per-channel squared errors to ``sums``; a mismatch reason, or ""."""
    o, r, c = orig.detach().double(), ref.detach().double(), cand.detach().double()
    if not _same_nonfinite(o, c):
        return f"output {name} has inf/nan where the original's differ"
    if o.numel() == 0:
        return ""
    mask = torch.isfinite(o) & torch.isfinite(r)
    zero = torch.zeros((), dtype=torch.float64, device=o.device)
    squares = [_channels(torch.where(mask, t, zero)).square().sum(1) for t in (c - r, o - r, r)]
    count = _channels(mask).sum(1).double()
    per_element = o.dim() < 2
    key = (name, tuple(o.shape) if per_element else o.shape[1])
    if key in sums:
        sums[key].add(*squares, count)
    else:
        sums[key] = _Sums(floor, orig.dtype, per_element, *squares, count)
    return ""


def _worst(sums: dict[tuple, _Sums], calibrated: bool) -> tuple[_Worst, int, int]:
    """The channel with the highest error-to-allowance ratio over all outputs; elements compared; ill channels."""
    worst, elements, ill = _Worst(), 0, 0
    for (name, kind), t in sums.items():
        total = float(t.count.sum())
        elements += int(total)
        if total == 0 or kind == "integer":  # integer outputs were compared for equality
            continue
        rms = math.sqrt(float(t.ref.sum()) / total)
        scale = t.ref.sqrt() if not t.per_element else rms * t.count.sqrt()  # per element: the output's scale
        scale = torch.where(scale > 0, scale, rms * t.count.sqrt())  # an all-zero channel: the output's scale
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero output: absolute error
        err, own = t.diff.sqrt() / scale, t.own.sqrt() / scale
        own_output = math.sqrt(float(t.own.sum()) / float(t.ref.sum())) if float(t.ref.sum()) > 0 else 0.0
        own = own.clamp(min=own_output)
        allowed = torch.clamp(K * own, min=t.floor)
        ratio = torch.where(t.count > 0, err / allowed, torch.zeros_like(err))
        i = int(torch.argmax(torch.nan_to_num(ratio, nan=math.inf)))
        if calibrated:
            ill += int(((own > 1e-2) & (t.count > 0)).sum())
        if not ratio[i].item() <= worst.ratio:  # also where it is nan
            dtype = str(t.dtype).removeprefix("torch.")
            by_own = calibrated and K * own[i].item() > t.floor
            worst = _Worst(ratio[i].item(), err[i].item(), allowed[i].item(), name,
                           None if t.per_element else i,
                           f"{K}x the model's own {dtype} rounding" if by_own else f"the {dtype} floor")
    return worst, elements, ill


def _path(keypath: tuple) -> str:
    return "".join(str(k) for k in keypath) or "0"


def compare_outputs(orig: Any, ref: Any, cand: Any, sums: dict[tuple, _Sums], *, floor: float | None = None,
                    floor_scale: float = 1.0) -> str:
    """Compare one candidate output tree with the original's (own dtype) and float64 ones.

    Structure, shapes, dtypes, integer values and the inf/nan pattern must match exactly (else the reason is
    returned); the floating values' per-channel squared errors are added to ``sums``.
    """
    o_leaves, o_spec = pytree.tree_flatten_with_path(orig)
    c_leaves, c_spec = pytree.tree_flatten(cand)
    r_leaves = pytree.tree_leaves(ref)
    if o_spec != c_spec:
        return f"the output structure differs: {c_spec} instead of {o_spec}"
    for (keypath, o), r, c in zip(o_leaves, r_leaves, c_leaves):
        name = _path(keypath)
        if not isinstance(o, torch.Tensor):
            if o != c:
                return f"output {name} is {c!r} instead of {o!r}"
            continue
        if not isinstance(c, torch.Tensor) or c.shape != o.shape or c.dtype != o.dtype:
            got = f"{tuple(c.shape)} {c.dtype}" if isinstance(c, torch.Tensor) else type(c).__name__
            return f"output {name} is {got} instead of {tuple(o.shape)} {o.dtype}"
        if not o.is_floating_point():
            if not torch.equal(o, c):
                return f"integer output {name} differs"
            sums.setdefault((name, "integer"), _Sums(0.0, o.dtype, True, *[torch.zeros(1, dtype=torch.float64)] * 3,
                                                      torch.zeros(1, dtype=torch.float64))).count += o.numel()
            continue
        why = _accumulate(o, r, c, (floor if floor is not None else _floor(o.dtype)) * floor_scale, name, sums)
        if why:
            return why
    return ""


def _describe(inputs: Inputs) -> str:
    shapes = [tuple(x.shape) for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
    return ", ".join(str(s) for s in shapes)


QUICK = 0.9
"""The quick check's share of the floor. A candidate within ``QUICK x floor`` of the original's own-dtype outputs
on every channel passes the full check too: ``|c - r| <= |c - o| + |o - r|``, and whatever the original's own
error ``|o - r|`` is, ``QUICK x floor + |o - r|`` stays within ``max(floor, K |o - r|)`` as long as
``QUICK < (K - 1) / K`` (0.9375; the margin covers the channel's norm in ``o`` against ``r``). So the float64 run
is made only where some channel comes closer to its allowance than that."""


class Reference:
    """The original model's outputs on the trial inputs, in its own dtype, and in float64 when a check needs them:
    made once, then :meth:`check` compares any number of candidates with them (``optimize`` and the culprit
    search reuse it)."""

    def __init__(self, original: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any] | None = None, *,
                 original64: Callable[..., Any] | None = None, dynamic: Dynamic | None = None,
                 floor: float | None = None, seed: int = 0,
                 covers: Callable[[tuple, dict], Any] | None = None) -> None:
        """Run ``original`` (own dtype) on the trial inputs, each from its state as it is now (a module's buffers
        are restored after every run); keep ``original64`` (the same model in float64, fed float64 inputs) for
        the first check that needs it.

        ``original64=None`` means the model is float64 already. ``floor`` overrides :data:`FLOOR`. Where the
        float64 run fails, the own-dtype outputs are the reference and only the floor is allowed. ``covers``
        raises for inputs the capture does not cover (its shape guards): such trial sets are left out.
        """
        self.floor = floor
        self.sets, self.shapes, self.speculative, note = trial_inputs(tuple(args), dict(kwargs or {}), dynamic, seed)
        self.notes = [note] if note else []
        if covers is not None:
            kept = [0]
            for i, (a, k) in enumerate(self.sets[1:], 1):
                try:
                    covers(a, k)
                    kept.append(i)
                except Exception as err:
                    self.notes.append(f"inputs of shape {_describe((a, k))} were not tried: the capture does not "
                                      f"cover them ({type(err).__name__})")
            self.sets, self.speculative = [self.sets[i] for i in kept], [self.speculative[i] for i in kept]
        self.outputs: list[Any] = []
        self._original64 = original64
        self._outputs64: list[Any] | None = None if original64 is not None else self.outputs
        self.calibrated = original64 is not None
        with torch.no_grad():
            for i, (a, k) in enumerate(list(self.sets)):
                try:
                    with state_kept(original):
                        self.outputs.append(original(*fresh_copies(a), **fresh_copies(k)))
                except Exception as err:
                    if i == 0:
                        raise _original_failed(original, (a, k), err) from err
                    self.notes.append(f"the original model does not run on inputs of shape {_describe((a, k))} "
                                      f"({type(err).__name__}), so they were not compared")
                    self.sets, self.speculative = self.sets[:i], self.speculative[:i]
                    break

    @property
    def outputs64(self) -> list[Any]:
        """The float64 outputs, run on first use (the own-dtype ones where the model is float64 already or does
        not run in float64)."""
        if self._outputs64 is None:
            self._outputs64 = self._run64()
        return self._outputs64

    @torch.no_grad()
    def _run64(self) -> list[Any]:
        """The float64 twin's outputs on the trial sets, or the own-dtype ones (and a note) where it fails."""
        try:
            outputs = [self._original64(*fresh_copies(pytree.tree_map(_float64, a)),
                                        **fresh_copies(pytree.tree_map(_float64, k))) for a, k in self.sets]
            if any(pytree.tree_structure(x) != pytree.tree_structure(y) for x, y in zip(self.outputs, outputs)):
                raise TypeError("its outputs have another structure in float64")
            return outputs
        except Exception as err:
            self.calibrated = False
            first = str(err).splitlines()[0][:120] if str(err) else ""
            self.notes.append(f"the model does not run in float64 ({type(err).__name__}: {first}), so the allowed "
                              "error is the dtype floor")
            return self.outputs

    def check(self, candidate: Callable[..., Any]) -> Verification:
        """Run ``candidate`` in its own dtype on the trial inputs, each from its state as it is now (a module's
        buffers are restored after every run), and compare it with the reference per channel:
        first with the original's own-dtype outputs (the quick check, :data:`QUICK`), then, only where that
        does not settle it, with the float64 ones.

        Never ok where no element could be compared (every output empty, or the only non-empty inputs are at
        a shape the capture did not promise and the candidate does not run there).
        """
        runs: list[tuple[int, Any, str]] = []  # (trial set, candidate's outputs, input shapes)
        notes = list(self.notes)
        for i, ((a, k), speculative) in enumerate(zip(self.sets, self.speculative)):
            try:
                with torch.no_grad(), state_kept(candidate):
                    out = candidate(*fresh_copies(a), **fresh_copies(k))
            except Exception as err:
                first = str(err).splitlines()[0][:200] if str(err) else ""
                if speculative:
                    notes.append(f"the optimized module does not run on inputs of shape {_describe((a, k))}, which "
                                 f"the capture did not promise ({type(err).__name__})")
                    continue
                return self._failed(f"the optimized module raised {type(err).__name__} on inputs of shape "
                                    f"{_describe((a, k))}: {first}", len(runs), len({r[2] for r in runs}))
            runs.append((i, out, _describe((a, k))))
        quick = self._compare(runs, self.outputs, notes, QUICK)
        if quick.ok or not quick.checked or math.isinf(quick.error):
            return quick
        reference = self.outputs64  # the float64 run, made on first use
        notes += [n for n in self.notes if n not in notes]
        return self._compare(runs, reference, notes, 1.0, calibrated=self.calibrated)

    def _compare(self, runs: list[tuple[int, Any, str]], reference: list[Any], notes: list[str],
                 floor_scale: float, *, calibrated: bool = False) -> Verification:
        """Compare every run's outputs with ``reference`` (per trial set) channel by channel, allowed
        ``floor_scale`` x the floor (and, where ``calibrated``, ``K`` x the original's own rounding)."""
        sums: dict[tuple, _Sums] = {}
        for n, (i, out, shape) in enumerate(runs, 1):
            why = compare_outputs(self.outputs[i], reference[i], out, sums, floor=self.floor, floor_scale=floor_scale)
            if why:
                return self._failed(f"{why} (inputs of shape {shape})", n, len({r[2] for r in runs[:n]}))
        worst, elements, ill = _worst(sums, calibrated)
        if elements == 0:
            return not_checked("no output element could be compared (" + ("; ".join(notes) or "every output is empty")
                               + ")")
        basis = worst.basis if floor_scale == 1.0 else f"{worst.basis.replace('the ', '', 1)} x {floor_scale}, " \
            "against the original's own outputs: no float64 run needed"
        return Verification(worst.error, worst.allowed, len(runs), len({r[2] for r in runs}), output=worst.output,
                            channel=worst.channel, basis=basis, elements=elements, ill_conditioned=ill,
                            note="; ".join(notes))

    def _failed(self, why: str, runs: int, shapes: int) -> Verification:
        return Verification(math.inf, self.floor or FLOOR[torch.float32], runs, shapes, basis="exact match required",
                            elements=1, note=why)


def _original_failed(original: Callable[..., Any], inputs: Inputs, err: Exception) -> VerificationError:
    """The error for an original that does not run on its own example inputs: nothing can be compared with it."""
    name = type(original).__name__ if isinstance(original, nn.Module) else getattr(original, "__name__", "the model")
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return VerificationError(
        f"could not verify: {name} itself raised {type(err).__name__} on its example inputs ({_describe(inputs)}): "
        f"{first}. Check that the model runs on them (model(*example_inputs)); if it does, its state was changed "
        "before verification (a cache left inconsistent): please report the model", pass_name=None,
        error=math.nan, tolerance=math.nan)


def verify(original: Callable[..., Any], candidate: Callable[..., Any], args: tuple,
           kwargs: Mapping[str, Any] | None = None, **options: Any) -> Verification:
    """One-shot :class:`Reference` ``(original, args, kwargs, **options)`` and its check of ``candidate``."""
    return Reference(original, args, kwargs, **options).check(candidate)
