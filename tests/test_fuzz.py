"""Fuzzing: random models from the foldable vocabulary and its traps either fold exactly or are left alone.

Each model is a random DAG over tensors of one shape: convs (1d/2d/3d, groups, dilation, bias, padding
modes), batch norms (affine or not, running statistics or not, random statistics), average pools (with
and without count_include_pad), constant scales and shifts, explicit pads before unpadded convs, ReLU,
and add/sub of any two earlier tensors, so that tensors get shared and unshared consumers. For every
model ``optimize`` must return a module equal to the original (float32 relative error < 1e-5, float64
< 1e-12) with its refusals reported - never a wrong result, never an unhandled exception.
``FXREPARAM_FUZZ_EXAMPLES=10000`` runs as many as you ask; ``FXREPARAM_FUZZ_LOG=file`` logs each model.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from conftest import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms

CHANNELS = 4
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


class RandomNet(nn.Module):
    """Interprets a list of op specs; every op keeps the [N, C, *S] shape so any two tensors can be added."""

    def __init__(self, dims: int, ops: list[tuple]) -> None:
        super().__init__()
        self.dims, self.ops = dims, ops
        self.layers = nn.ModuleList()
        self.consts = nn.ParameterList()
        for kind, params, *_ in ops:
            self.layers.append(self._layer(kind, params))
            shape = (1, CHANNELS) + (1,) * dims
            self.consts.append(nn.Parameter(torch.randn(shape) if kind in ("scale", "shift") else torch.zeros(1)))

    def _layer(self, kind: str, p: dict) -> nn.Module:
        d = self.dims
        if kind == "conv":
            pad = p["dilation"] * (p["k"] - 1) // 2
            return CONV[d](CHANNELS, CHANNELS, p["k"], 1, pad, p["dilation"], p["groups"], p["bias"],
                           padding_mode=p["mode"])
        if kind == "pad_conv":
            return CONV[d](CHANNELS, CHANNELS, 3, 1, 0, 1, p["groups"], p["bias"])
        if kind == "bn":
            return BN[d](CHANNELS, affine=p["affine"], track_running_stats=p["stats"])
        if kind == "pool":
            return POOL[d](3, 1, 1, count_include_pad=p["include_pad"])
        return nn.Identity()

    def forward(self, x: torch.Tensor):
        tensors = [x]
        for (kind, p, a, b), layer, const in zip(self.ops, self.layers, self.consts):
            u, v = tensors[a % len(tensors)], tensors[b % len(tensors)]
            if kind in ("conv", "bn", "pool"):
                y = layer(u)
            elif kind == "pad_conv":
                y = layer(F.pad(u, [1] * (2 * self.dims), value=p["value"]))
            elif kind == "scale":
                y = u * const
            elif kind == "shift":
                y = u + const
            elif kind == "relu":
                y = torch.relu(u)
            elif kind == "add":
                y = u + v
            else:  # sub
                y = u - v
            tensors.append(y)
        return tensors[-1], tensors[len(tensors) // 2]  # a second output keeps some middle tensor alive


conv_params = st.fixed_dictionaries({
    "k": st.sampled_from([1, 3, 5]), "dilation": st.sampled_from([1, 2]), "groups": st.sampled_from([1, 2, 4]),
    "bias": st.booleans(), "mode": st.sampled_from(["zeros", "zeros", "reflect", "circular"])})
op = st.one_of(
    st.tuples(st.just("conv"), conv_params),
    st.tuples(st.just("pad_conv"), st.fixed_dictionaries({"groups": st.sampled_from([1, 2]), "bias": st.booleans(),
                                                          "value": st.sampled_from([0.0, 0.5])})),
    st.tuples(st.just("bn"), st.fixed_dictionaries({"affine": st.booleans(),
                                                    "stats": st.sampled_from([True, True, True, False])})),
    st.tuples(st.just("pool"), st.fixed_dictionaries({"include_pad": st.booleans()})),
    st.tuples(st.sampled_from(["scale", "shift", "relu", "add", "sub"]), st.just({})),
)
op_with_sources = st.tuples(op, st.integers(0, 7), st.integers(0, 7)).map(lambda t: (t[0][0], t[0][1], t[1], t[2]))


@settings(max_examples=int(os.environ.get("FXREPARAM_FUZZ_EXAMPLES", 300)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(dims=st.sampled_from([1, 2, 2, 3]), ops=st.lists(op_with_sources, min_size=1, max_size=8),
       dtype=st.sampled_from([torch.float32, torch.float64]), capture=st.sampled_from(["export", "symbolic_trace"]),
       seed=st.integers(0, 2**16))
def test_random_models_fold_exactly_or_are_left_alone(dims, ops, dtype, capture, seed):
    torch.manual_seed(seed)
    model = randomize_batch_norms(RandomNet(dims, ops), seed=seed).to(dtype).eval()
    x = torch.randn(2, CHANNELS, *[6] * dims, dtype=dtype)
    folded = fxreparam.optimize(model, x, capture=capture)  # raises VerificationError on any inexact fold
    rep = fxreparam.report(folded)
    assert rep.verification.ok
    y = torch.randn(2, CHANNELS, *[6] * dims, dtype=dtype)
    with torch.no_grad():
        err = rel_err(model(y), folded(y))
    assert err < (1e-12 if dtype == torch.float64 else 1e-5), err
    assert rep.after.conv <= rep.before.conv + sum(kind == "pool" for kind, *_ in ops)
    if os.environ.get("FXREPARAM_FUZZ_LOG"):  # long runs: one line per model, to count and to replay
        with open(os.environ["FXREPARAM_FUZZ_LOG"], "a") as log:
            log.write(f"ok dims={dims} ops={len(ops)} {dtype} {capture} refused={len(rep.refusals)} "
                      f"convs={rep.before.conv}->{rep.after.conv} err={err:.1e}\n")
