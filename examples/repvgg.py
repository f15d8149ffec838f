"""RepVGG (Ding et al., CVPR 2021): each block trains 3x3-BN + 1x1-BN + identity-BN branches and is one
3x3 conv at inference. Built here as the paper describes RepVGG-A0 (widths 48-96-192-384-1280, 1-2-4-14-1
blocks); ``fxreparam.optimize`` turns it into a VGG-style stack of 3x3 convs.

    python examples/repvgg.py [--size 224]
"""

from __future__ import annotations

import argparse

import torch
from _report import summarize
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms


def conv_bn(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.rbr_dense = conv_bn(cin, cout, 3, stride)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride)
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return torch.relu(out)


class RepVGG(nn.Module):
    def __init__(self, blocks=(1, 2, 4, 14, 1), widths=(48, 48, 96, 192, 1280), num_classes: int = 1000) -> None:
        super().__init__()
        layers, cin = [], 3
        for n, width in zip(blocks, widths):
            for i in range(n):
                layers.append(RepVGGBlock(cin, width, 2 if i == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x).mean((2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = randomize_batch_norms(RepVGG()).eval()
    x = torch.randn(1, 3, args.size, args.size)
    summarize("RepVGG-A0", model, fxreparam.optimize(model, x), x)


if __name__ == "__main__":
    main()
