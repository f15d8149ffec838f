"""Helpers for testing folds honestly: one pass on a small graph, and batch norms with real statistics.

:func:`run_pass` captures a small model as ``optimize`` does (``torch.export`` by default, so a pass sees the
aten graph users get; ``capture="symbolic_trace"`` for the module-call form), runs one registered pass on it and
measures how far the rewritten graph is from the model, so each pass has a test of its own that runs in
milliseconds.
A BatchNorm fresh from its constructor (mean 0, var 1, gamma 1, beta 0) is the identity up to eps
and hides a wrong fold; every test and example gives them random values first.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from . import ops
from .capture import capture as capture_graph
from .pipeline import run_passes
from .registry import Refusal, resolve
from .verify import fresh_copies

__all__ = ["PassRun", "calibrate_batch_norms", "executed_ops", "randomize_batch_norms", "run_pass"]


@dataclass
class PassRun:
    """One pass run on a small model: the rewritten graph, how many rewrites, what was refused, the error."""

    gm: fx.GraphModule
    rewrites: int
    refusals: list[Refusal]
    error: float

    def count(self, kind: str) -> int:
        """How many ``"conv"``, ``"linear"``, ``"batch_norm"``, ``"add_sub"`` or ``"mul_div"`` ops remain."""
        return sum(ops.op_kind(self.gm, n) == kind for n in self.gm.graph.nodes)

    def layers(self, kind: type[nn.Module] = nn.Module) -> list[nn.Module]:
        """The modules of type ``kind`` that the rewritten graph calls, in graph order: in an export graph only the
        layers a pass emitted (export's own ops are aten calls; :meth:`count` counts both forms)."""
        called = [self.gm.get_submodule(str(n.target)) for n in self.gm.graph.nodes if n.op == "call_module"]
        return [m for m in called if isinstance(m, kind)]

    @property
    def reasons(self) -> str:
        return " | ".join(r.reason for r in self.refusals)


def run_pass(name: str, model: nn.Module, *inputs: torch.Tensor, randomize: bool = True,
             capture: str = "export") -> PassRun:
    """Capture ``model`` (eval mode) on ``inputs`` with fxreparam's own capture, run the pass ``name`` alone to a
    fixpoint, and measure the largest elementwise error of the rewritten graph against ``model``, relative to each
    output's scale. ``capture``: ``"export"`` (what ``optimize`` captures given example inputs: aten ops, functional) or
    ``"symbolic_trace"`` (module calls, in-place ops as written). With ``randomize`` BatchNorms get random
    statistics first."""
    model = copy.deepcopy(model)
    model = (randomize_batch_norms(model) if randomize else model).eval()
    gm = capture_graph(model, fresh_copies(inputs), None, capture).gm
    log = run_passes(gm, resolve(name))
    gm.recompile()
    with torch.no_grad():  # each run on its own copy: a model that writes into its input must not feed the next
        want = pytree.tree_leaves(model(*fresh_copies(inputs)))
        got = pytree.tree_leaves(gm(*fresh_copies(inputs)))
    error = max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-30)) for w, g in zip(want, got))
    return PassRun(gm, sum(s.rewrites for s in log.stats.values()), log.refusals, error)


def _macs(func, args, out) -> int:
    """Multiply-accumulates of one executed conv or matrix product (0 for every other op)."""
    name = func.overloadpacket.__name__
    if "convolution" in name and not isinstance(out, tuple):
        transposed = len(args) > 6 and bool(args[6])
        return (args[0] if transposed else out).numel() * args[1][0].numel()
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a = args[1] if name in ("addmm", "baddbmm") else args[0]
        return out.numel() * a.shape[-1]
    return 0


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        out = func(*args, **(kwargs or {}))
        self.macs += _macs(func, args, out)
        return out


def executed_ops(model: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """The conv, linear, batch-norm and add ops one forward pass executes, counted at the aten level, and the
    multiply-accumulates of its convs and matrix products."""
    with torch.no_grad(), _CountOps() as mode:
        model(*inputs)
    c = mode.counts
    return {"conv": sum(n for k, n in c.items() if "conv" in k),
            "linear": sum(c[k] for k in ("addmm", "mm", "bmm", "baddbmm")),
            "batch_norm": sum(n for k, n in c.items() if "batch_norm" in k),
            "add": sum(n for k, n in c.items() if k.startswith("add") and k != "addmm"),
            "macs": mode.macs}


def stored_elements(model: nn.Module) -> int:
    """Elements of every floating-point parameter and buffer: what the model has to keep in memory."""
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


@torch.no_grad()
def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm of ``model`` random running statistics and affine parameters (in place)."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            continue
        shape = (mod.num_features,)
        if mod.running_mean is not None:
            mod.running_mean.copy_(0.5 * torch.randn(shape, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(shape, generator=g))
        if mod.affine:
            mod.weight.copy_(1.0 + 0.3 * torch.randn(shape, generator=g))
            mod.bias.copy_(0.3 * torch.randn(shape, generator=g))
    return model


@torch.no_grad()
def calibrate_batch_norms(model: nn.Module, *inputs: torch.Tensor, seed: int = 0) -> nn.Module:
    """Set every BatchNorm's running statistics to the batch statistics of ``inputs``, as training would.

    Deep plain nets (DiracNet at depth 1000) overflow with random statistics; calibrated ones keep
    activations near unit scale. Affine parameters are then randomized, so BNs stay non-trivial.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
        m.train()
    model(*inputs)
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)
    model.train(was_training)
    g = torch.Generator().manual_seed(seed)
    for m in bns:
        if m.affine:
            m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model
