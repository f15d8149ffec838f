"""The training-time blocks that :func:`fxreparam.expand` puts in place of a conv (or a conv followed by a BN).

Each block is the sum of its branches: ``main`` is the model's own conv (with its own BN where one
followed it), and every added branch ends in a BatchNorm whose weight and bias start at zero, so the
block computes exactly the original function at initialization, in eval and in train mode alike.
Nothing here is known to the folding passes: ``fxreparam.optimize`` folds these blocks from the graph.

Geometry: for the model's ``k x k`` conv with padding ``p`` (per dim), a branch with kernel ``(kh, kw)``
takes padding ``p - (k - kh) // 2`` so that its kernel center meets the kxk's (REPARAM §3); a negative
value is a crop of the input (REPARAM §10, ACNet's ``padding < k // 2``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACBlock", "BNAndPad", "ConvBN", "DiverseBranchBlock", "Geometry", "MobileOneBlock", "RepVGGBlock"]


@dataclass(frozen=True)
class Geometry:
    """What a branch must agree on with the model's conv: channels, square kernel, stride, padding, groups."""

    in_channels: int
    out_channels: int
    k: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    factory: dict  # device and dtype of the conv's weight

    @classmethod
    def of(cls, conv: nn.Conv2d) -> Geometry:
        padding = (conv.kernel_size[0] // 2,) * 2 if conv.padding == "same" else (
            (0, 0) if conv.padding == "valid" else tuple(conv.padding))
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], tuple(conv.stride), padding, conv.groups,
                   {"device": conv.weight.device, "dtype": conv.weight.dtype})

    def padding_for(self, kernel: tuple[int, int]) -> tuple[int, int]:
        """The padding that puts a ``kernel`` branch's center on the kxk's (negative: a crop)."""
        return (self.padding[0] - (self.k - kernel[0]) // 2, self.padding[1] - (self.k - kernel[1]) // 2)

    @property
    def has_identity(self) -> bool:
        """Whether ``x`` itself has the conv's output shape: as many outputs as inputs, stride 1, "same" padding."""
        return (self.in_channels == self.out_channels and self.stride == (1, 1)
                and self.padding == (self.k // 2, self.k // 2))


def zero_bn(channels: int, like: nn.BatchNorm2d | None, factory: dict) -> nn.BatchNorm2d:
    """A BN whose weight and bias are zero: its branch adds exactly 0 until training moves them."""
    eps, momentum = (like.eps, like.momentum) if like is not None else (1e-5, 0.1)
    bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, **factory)
    nn.init.zeros_(bn.weight)
    nn.init.zeros_(bn.bias)
    return bn


class ConvBN(nn.Module):
    """A conv then a BN, reading the input cropped by ``crop`` pixels per side where the branch needs a crop."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, crop: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.conv, self.bn, self.crop = conv, bn, crop

    @classmethod
    def branch(cls, g: Geometry, kernel: tuple[int, int], like: nn.BatchNorm2d | None) -> ConvBN:
        """An added branch with a ``kernel`` conv (no bias) aligned with the kxk, ending in a zero BN."""
        padding = g.padding_for(kernel)
        conv = nn.Conv2d(g.in_channels, g.out_channels, kernel, g.stride, tuple(max(p, 0) for p in padding),
                         groups=g.groups, bias=False, **g.factory)
        return cls(conv, zero_bn(g.out_channels, like, g.factory), tuple(max(-p, 0) for p in padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ch, cw = self.crop
        if ch:
            x = x[:, :, ch:-ch]
        if cw:
            x = x[:, :, :, cw:-cw]
        return self.bn(self.conv(x))


def main_branch(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> nn.Module:
    """The model's own conv, with the BN that followed it (if any): the branch that carries the function."""
    return ConvBN(conv, bn) if bn is not None else conv


def identity_bn(g: Geometry, like: nn.BatchNorm2d | None) -> nn.BatchNorm2d | None:
    """RepVGG's and MobileOne's BN-only branch on ``x``, where ``x`` has the output's shape."""
    return zero_bn(g.out_channels, like, g.factory) if g.has_identity else None


class BNAndPad(nn.Module):
    """A BN, then a zero pad whose border is overwritten with the BN's output for a zero input (DBB's
    ``BNAndPadLayer``): the 1x1-BN before it and the conv after it are then one conv of the zero-padded input.

    As in the DBB reference code the border is computed from the running statistics and carries no gradient.
    """

    def __init__(self, channels: int, pad: tuple[int, int], factory: dict) -> None:
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(channels, **factory), pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        (ph, pw), bn = self.pad, self.bn
        if not (ph or pw):
            return out
        values = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        values = values.view(1, -1, 1, 1)
        # functional border writes (slice_scatter rather than the reference's in-place slice assignments): the
        # same values, captured by torch.export many times faster; expand_as reads no (dynamic) batch size
        out = F.pad(out, [pw, pw, ph, ph])
        h, w = out.shape[-2:]
        if ph:
            rows = values.expand_as(out[:, :, :ph])
            out = torch.slice_scatter(torch.slice_scatter(out, rows, 2, 0, ph), rows, 2, h - ph, h)
        if pw:
            cols = values.expand_as(out[:, :, :, :pw])
            out = torch.slice_scatter(torch.slice_scatter(out, cols, 3, 0, pw), cols, 3, w - pw, w)
        return out


class RepVGGBlock(nn.Module):
    """RepVGG (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021): kxk-BN + 1x1-BN, plus a
    BN-only identity branch where the input has the output's shape; summed, one kxk conv at inference."""

    def __init__(self, main: nn.Module, rbr_1x1: ConvBN | None, rbr_identity: nn.BatchNorm2d | None) -> None:
        super().__init__()
        self.main, self.rbr_1x1, self.rbr_identity = main, rbr_1x1, rbr_identity

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> RepVGGBlock | None:
        """The block for ``conv`` (a 1x1 conv gets the identity branch alone); ``None`` if no branch applies."""
        g = Geometry.of(conv)
        rbr_1x1 = ConvBN.branch(g, (1, 1), bn) if g.k > 1 else None
        rbr_identity = identity_bn(g, bn)
        if rbr_1x1 is None and rbr_identity is None:
            return None
        return cls(main_branch(conv, bn), rbr_1x1, rbr_identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.main(x)
        if self.rbr_1x1 is not None:
            out = out + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return out


class ACBlock(nn.Module):
    """ACNet (Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via Asymmetric Convolution
    Blocks", ICCV 2019): kxk-BN + 1xk-BN + kx1-BN, the asymmetric kernels adding into the square one's skeleton."""

    def __init__(self, main: nn.Module, hor: ConvBN, ver: ConvBN) -> None:
        super().__init__()
        self.main, self.hor, self.ver = main, hor, ver

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> ACBlock | None:
        """The block for a kxk ``conv`` (k > 1); ``None`` for a 1x1, which has no skeleton to strengthen."""
        g = Geometry.of(conv)
        if g.k == 1:
            return None
        return cls(main_branch(conv, bn), ConvBN.branch(g, (1, g.k), bn), ConvBN.branch(g, (g.k, 1), bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.hor(x) + self.ver(x)


class DiverseBranchBlock(nn.Module):
    """Diverse Branch Block (Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like
    Unit", CVPR 2021): kxk-BN + 1x1-BN + 1x1-BN-avg-BN + 1x1-BN-kxk-BN, where each BN before a padded layer pads
    with its own output for zero (:class:`BNAndPad`) so that every chain is exactly one kxk conv.

    As in the DBB reference code: the 1x1 of the 1x1-kxk chain has ``in_channels`` outputs and starts as the
    identity, or ``2 * in_channels`` outputs for a depthwise conv; a depthwise conv's avg branch pools ``x``
    itself (a 1x1 there would be a per-channel scale that the BN after it normalizes away).
    """

    def __init__(self, main: nn.Module, dbb_1x1: ConvBN, dbb_avg: nn.Sequential, dbb_1x1_kxk: nn.Sequential
                 ) -> None:
        super().__init__()
        self.main, self.dbb_1x1, self.dbb_avg, self.dbb_1x1_kxk = main, dbb_1x1, dbb_avg, dbb_1x1_kxk

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> DiverseBranchBlock | None:
        """The block for a kxk ``conv`` (k > 1); ``None`` for a 1x1, where DBB's branches have nothing to add."""
        g = Geometry.of(conv)
        if g.k == 1:
            return None
        return cls(main_branch(conv, bn), ConvBN.branch(g, (1, 1), bn), _avg_branch(g, bn), _1x1_kxk_branch(g, bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.dbb_1x1(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)


def _depthwise(g: Geometry) -> bool:
    return g.groups == g.in_channels == g.out_channels


def _avg_branch(g: Geometry, like: nn.BatchNorm2d | None) -> nn.Sequential:
    """1x1-BN-avg-BN (depthwise: avg-BN): an average pool is a depthwise kxk conv with weight 1/k^2 (REPARAM §7)."""
    p = g.padding
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if _depthwise(g) and max(p) <= g.k // 2:
        layers["avg"] = nn.AvgPool2d(g.k, g.stride, p)  # count_include_pad: the zero padding counts, as a conv's
    else:
        layers["conv"] = nn.Conv2d(g.in_channels, g.out_channels, 1, groups=g.groups, bias=False, **g.factory)
        layers["bn"] = BNAndPad(g.out_channels, p, g.factory)
        layers["avg"] = nn.AvgPool2d(g.k, g.stride, 0)
    layers["avgbn"] = zero_bn(g.out_channels, like, g.factory)
    return nn.Sequential(layers)


def _1x1_kxk_branch(g: Geometry, like: nn.BatchNorm2d | None) -> nn.Sequential:
    """1x1-BN-kxk-BN: a 1x1 then a kxk with the same groups compose, per group, into one kxk (REPARAM §6, §9)."""
    internal = g.in_channels if g.groups < g.out_channels else 2 * g.in_channels
    conv1 = nn.Conv2d(g.in_channels, internal, 1, groups=g.groups, bias=False, **g.factory)
    if internal == g.in_channels:
        with torch.no_grad():  # identity-based 1x1, as DBB's: each group's channel i starts as input channel i
            conv1.weight.copy_(torch.eye(internal // g.groups, **g.factory).repeat(g.groups, 1)[..., None, None])
    return nn.Sequential(OrderedDict(
        conv1=conv1,
        bn1=BNAndPad(internal, g.padding, g.factory),
        conv2=nn.Conv2d(internal, g.out_channels, g.k, g.stride, 0, groups=g.groups, bias=False, **g.factory),
        bn2=zero_bn(g.out_channels, like, g.factory)))


class MobileOneBlock(nn.Module):
    """MobileOne (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023): ``k`` kxk-BN
    branches (``main`` and ``k - 1`` more), a 1x1-BN scale branch (for k > 1) and a BN-only identity branch where
    the input has the output's shape. Its 1x1 (pointwise) convs get the kxk branches at k = 1 and the identity."""

    def __init__(self, main: nn.Module, rbr_conv: nn.ModuleList, rbr_scale: ConvBN | None,
                 rbr_skip: nn.BatchNorm2d | None) -> None:
        super().__init__()
        self.main, self.rbr_conv, self.rbr_scale, self.rbr_skip = main, rbr_conv, rbr_scale, rbr_skip

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, conv_branches: int = 3) -> MobileOneBlock | None:
        """The block for ``conv`` with ``conv_branches`` kxk-BN branches in all; ``None`` if no branch applies."""
        g = Geometry.of(conv)
        rbr_conv = nn.ModuleList(ConvBN.branch(g, (g.k, g.k), bn) for _ in range(conv_branches - 1))
        rbr_scale = ConvBN.branch(g, (1, 1), bn) if g.k > 1 else None
        rbr_skip = identity_bn(g, bn)
        if not len(rbr_conv) and rbr_scale is None and rbr_skip is None:
            return None
        return cls(main_branch(conv, bn), rbr_conv, rbr_scale, rbr_skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.main(x)
        for branch in self.rbr_conv:
            out = out + branch(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        return out
