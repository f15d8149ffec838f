"""Helpers for testing folds honestly: batch norms with statistics that are not the defaults.

A BatchNorm fresh from its constructor (mean 0, var 1, gamma 1, beta 0) is the identity
up to eps and hides a wrong fold; every test and example gives them random values first.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["calibrate_batch_norms", "executed_ops", "randomize_batch_norms"]


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def executed_ops(model: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """The conv, batch-norm and add ops one forward pass executes, counted at the aten level."""
    with torch.no_grad(), _CountOps() as mode:
        model(*inputs)
    c = mode.counts
    return {"conv": sum(n for k, n in c.items() if "conv" in k),
            "batch_norm": sum(n for k, n in c.items() if "batch_norm" in k),
            "add": sum(n for k, n in c.items() if k.startswith("add") and k != "addmm")}


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
