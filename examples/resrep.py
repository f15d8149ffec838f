"""ResRep (Ding et al., ICCV 2021): every conv-BN is followed by a 1x1 "compactor" trained with penalty
gradients; the conv-BN-compactor collapses into one conv at inference.

    python examples/resrep.py [--size 32]
"""

from __future__ import annotations

import argparse

import torch
from _report import summarize
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms


class CompactorBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.compactor = nn.Conv2d(cout, cout, 1, bias=False)
        nn.init.eye_(self.compactor.weight.view(cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.compactor(self.bn(self.conv(x))))


def resrep_net(widths=(16, 32, 32, 64, 64), num_classes: int = 10) -> nn.Sequential:
    layers, cin = [], 3
    for i, w in enumerate(widths):
        layers.append(CompactorBlock(cin, w, 2 if i in (1, 3) else 1))
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resrep_net()
    with torch.no_grad():  # a trained compactor is no longer the identity
        for m in model.modules():
            if isinstance(m, CompactorBlock):
                m.compactor.weight.add_(0.1 * torch.randn_like(m.compactor.weight))
    model = randomize_batch_norms(model).eval()
    x = torch.randn(1, 3, args.size, args.size)
    summarize("ResRep compactor net", model, fxreparam.optimize(model, x), x)


if __name__ == "__main__":
    main()
