"""Diverse Branch Block (Ding et al., CVPR 2021): a KxK conv trained as four branches - KxK-BN, 1x1-BN,
1x1-BN-AVG-BN and 1x1-BN-KxK-BN - where the BN before a padded layer pads with its own shift
("BNAndPad"), so that the 1x1-KxK and 1x1-AVG chains are each exactly one KxK conv. fxreparam finds the
padding by value, composes the chains, and sums the four branches into one conv.

    python examples/dbb.py [--size 56]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _report import summarize
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms


class BNAndPad(nn.Module):
    """BN, then pad with the value a zero input takes after the BN, as the DBB reference code does."""

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(channels), pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        p, bn = self.pad, self.bn
        values = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
        out = F.pad(out, [p] * 4)
        out[:, :, 0:p, :] = values
        out[:, :, -p:, :] = values
        out[:, :, :, 0:p] = values
        out[:, :, :, -p:] = values
        return out


class DiverseBranchBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        p = k // 2
        self.dbb_origin = nn.Sequential(nn.Conv2d(cin, cout, k, stride, p, groups=groups, bias=False),
                                        nn.BatchNorm2d(cout))
        self.dbb_1x1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False),
                                     nn.BatchNorm2d(cout))
        self.dbb_avg = nn.Sequential(nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False), BNAndPad(cout, p),
                                     nn.AvgPool2d(k, stride, 0), nn.BatchNorm2d(cout))
        self.dbb_1x1_kxk = nn.Sequential(nn.Conv2d(cin, cin, 1, 1, 0, groups=groups, bias=False), BNAndPad(cin, p),
                                         nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False),
                                         nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(x) + self.dbb_1x1(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)
        return torch.relu(out)


def dbb_net(widths=(32, 64, 64, 128, 128), num_classes: int = 100) -> nn.Sequential:
    layers, cin = [], 3
    for i, w in enumerate(widths):
        layers.append(DiverseBranchBlock(cin, w, stride=2 if i in (0, 1, 3) else 1))
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=56)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = randomize_batch_norms(dbb_net()).eval()
    x = torch.randn(1, 3, args.size, args.size)
    summarize("DBB net (5 blocks)", model, fxreparam.optimize(model, x), x)


if __name__ == "__main__":
    main()
