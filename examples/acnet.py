"""ACNet (Ding et al., ICCV 2019): every KxK conv-BN is trained with parallel 1xK and Kx1 conv-BN
branches ("asymmetric convolution blocks"), which add into the square kernel's skeleton at inference.
Built here on a small VGG-style CIFAR net.

    python examples/acnet.py [--size 32]
"""

from __future__ import annotations

import argparse

import torch
from _report import summarize
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms


class ACBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__()
        p = k // 2
        self.square = nn.Sequential(nn.Conv2d(cin, cout, (k, k), 1, (p, p), bias=False), nn.BatchNorm2d(cout))
        self.hor = nn.Sequential(nn.Conv2d(cin, cout, (1, k), 1, (0, p), bias=False), nn.BatchNorm2d(cout))
        self.ver = nn.Sequential(nn.Conv2d(cin, cout, (k, 1), 1, (p, 0), bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.square(x) + self.hor(x) + self.ver(x))


def acnet_vgg(widths=(64, 64, 128, 128, 256, 256, 512, 512), num_classes: int = 10) -> nn.Sequential:
    layers, cin = [], 3
    for i, w in enumerate(widths):
        layers.append(ACBlock(cin, w))
        if i % 2:
            layers.append(nn.MaxPool2d(2))
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = randomize_batch_norms(acnet_vgg()).eval()
    x = torch.randn(1, 3, args.size, args.size)
    summarize("ACNet VGG-8 (CIFAR)", model, fxreparam.optimize(model, x), x)


if __name__ == "__main__":
    main()
