"""End to end through ``fxreparam.optimize``: UniRepLKNet-like NHWC blocks (a Linear over channels-last, a layer scale,
a permute back to NCHW, a BatchNorm2d) and RepMLP-like partition reshapes fold every BN and layer-scale multiply into
the layers before the layout ops (``channel_layout``, docs/identities.md s14)."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxreparam
from fxreparam.testing import executed_ops, randomize_batch_norms, stored_elements
from fxreparam.verify import relative_error


class _Names(TorchDispatchMode):
    """Counts the aten ops one forward pass executes, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _counts(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    with torch.no_grad(), _Names() as mode:
        model(x)
    ops = executed_ops(model, x)
    return {"batch_norm": ops["batch_norm"], "conv": ops["conv"], "linear": ops["linear"],
            "mul": mode.counts["mul"] + mode.counts["mul_"], "macs": ops["macs"]}


class NHWCBlock(nn.Module):
    """dwconv -> permute -> LayerNorm -> Linear -> GELU -> Linear -> gamma * x -> permute back -> BN, plus the input;
    ``late_scale`` puts the layer scale after the BN on NCHW (``gamma.view(1, -1, 1, 1) * bn(y)``, UniRepLKNet's
    own order) instead of before the permute."""

    def __init__(self, c: int, late_scale: bool = False):
        super().__init__()
        self.dwconv, self.dw_bn = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.BatchNorm2d(c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.bn = nn.BatchNorm2d(c)
        self.late_scale = late_scale

    def forward(self, x):
        y = self.dw_bn(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        if self.late_scale:
            y = self.gamma.view(1, -1, 1, 1) * self.bn(y.permute(0, 3, 1, 2))
        else:
            y = self.bn((self.gamma * y).permute(0, 3, 1, 2))
        return x + y


@pytest.mark.parametrize("late_scale", [False, True])
def test_nhwc_blocks_fold_every_bn_and_layer_scale(late_scale):
    model = randomize_batch_norms(nn.Sequential(*[NHWCBlock(8, late_scale) for _ in range(3)])).eval()
    x = torch.randn(2, 8, 10, 10)
    folded = fxreparam.optimize(model, (x,))
    before, after = _counts(model, x), _counts(folded, x)
    assert (before["batch_norm"], before["mul"]) == (6, 3)
    assert (after["batch_norm"], after["mul"], after["conv"], after["linear"]) == (0, 0, 3, 6)
    assert after["macs"] <= before["macs"] and stored_elements(folded) < stored_elements(model)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-5
        x2 = torch.randn(5, 8, 10, 10)  # another batch size: the folded graph is not tied to the example's
        assert relative_error(model(x2), folded(x2)) < 1e-5
    assert not [r for r in fxreparam.report(folded).refusals if r.pass_name == "channel_layout"]


class PartitionFC(nn.Module):
    """RepMLP-like: a grouped 1x1 conv over partitions flattened to ``C*h*w`` channels, reshaped back to ``[N, C, h,
    w]`` and batch-normed per ``C``; then a view to ``[N, C*h*w]`` and a BatchNorm1d over those features."""

    def __init__(self, c: int, h: int, w: int, bn1d_per_channel: bool):
        super().__init__()
        self.c, self.h, self.w = c, h, w
        self.fc3 = nn.Conv2d(c * h * w, c * h * w, 1, groups=c)
        self.fc3_bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(c * h * w)
        self.bn1d_per_channel = bn1d_per_channel

    def forward(self, x):
        y = self.fc3(x.reshape(-1, self.c * self.h * self.w, 1, 1)).reshape(-1, self.c, self.h, self.w)
        y = self.conv(F.relu(self.fc3_bn(y)))
        return self.bn1d(y.view(y.size(0), -1))


@pytest.mark.parametrize("per_channel", [False, True])
def test_partition_reshapes_fold_where_the_vectors_are_per_channel(per_channel):
    c, h, w = 3, 2, 4
    model = randomize_batch_norms(PartitionFC(c, h, w, per_channel)).eval()
    if per_channel:  # a BatchNorm1d whose statistics are the same within each conv channel's h*w block
        with torch.no_grad():
            for t in (model.bn1d.weight, model.bn1d.bias, model.bn1d.running_mean, model.bn1d.running_var):
                t.copy_(t[:: h * w].repeat_interleave(h * w))
    x = torch.randn(4, c, h, w)
    folded = fxreparam.optimize(model, (x,))
    after = _counts(folded, x)
    assert after["batch_norm"] == (0 if per_channel else 1)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-5
    reasons = " | ".join(r.reason for r in fxreparam.report(folded).refusals if r.pass_name == "channel_layout")
    assert ("varies within one channel" in reasons) is not per_channel


def test_a_bn1d_over_chw_refused_here_folds_forward_into_the_linear_after_it():
    # the BatchNorm1d after view(N, -1) is not per conv channel, but it is per input feature of the Linear after it
    model = randomize_batch_norms(nn.Sequential(PartitionFC(3, 2, 4, False), nn.Linear(24, 5))).eval()
    x = torch.randn(4, 3, 2, 4)
    folded = fxreparam.optimize(model, (x,))
    assert (_counts(model, x)["batch_norm"], _counts(folded, x)["batch_norm"]) == (2, 0)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-5
