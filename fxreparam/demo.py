"""The built-in demo model: DiracNet (Zagoruyko and Komodakis, 2017), in its training form.

Each block is NCReLU, then a 3x3 conv whose kernel is computed in ``forward`` as
``alpha * dirac + beta * normalize(W)``, then BatchNorm: a plain VGG-like chain once the
Dirac parameterization and the batch norms are folded. ``fxreparam demo`` folds it; the
folded DiracNet-18-0.75 prints like the released deployment model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiracConv2d", "DiracNet", "NCReLU"]


class NCReLU(nn.Module):
    """Negative concatenated ReLU: ``cat([relu(x), -relu(-x)])``, doubling the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.clamp(min=0), x.clamp(max=0)], dim=1)


class DiracConv2d(nn.Conv2d):
    """A conv whose kernel is ``alpha * dirac + beta * normalize(W)``, per output channel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.alpha = nn.Parameter(torch.full((out_channels,), 5.0))
        self.beta = nn.Parameter(torch.full((out_channels,), 1e-5))
        self.register_buffer("delta", nn.init.dirac_(torch.empty_like(self.weight)))
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        normalized = F.normalize(w.view(w.shape[0], -1), dim=1).view_as(w)
        kernel = self.alpha.view(-1, 1, 1, 1) * self.delta + self.beta.view(-1, 1, 1, 1) * normalized
        return F.conv2d(x, kernel, self.bias, self.stride, self.padding)


class DiracBlock(nn.Module):
    """NCReLU -> Dirac-parameterized 3x3 conv -> BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.ncrelu = NCReLU()
        self.conv = DiracConv2d(2 * in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.ncrelu(x)))


class DiracNet(nn.Module):
    """DiracNet-``depth``-``width``: a stem, four groups sharing depth - 2 Dirac blocks, a classifier.

    ``depth`` counts the conv and linear layers; group widths are 64, 128, 256, 512 times ``width``.
    """

    def __init__(self, depth: int = 18, width: float = 0.75, num_classes: int = 1000, in_channels: int = 3,
                 groups: int = 4) -> None:
        super().__init__()
        if depth < 2 + groups:
            raise ValueError(f"depth must be at least {2 + groups} (a stem, a block per group, a classifier)")
        blocks_in = [(depth - 2) // groups + (g < (depth - 2) % groups) for g in range(groups)]
        widths = [max(1, round(64 * width * 2**g)) for g in range(groups)]
        self.conv = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        self.max_pool0 = nn.MaxPool2d(3, stride=2, padding=1)
        stages: list[nn.Module] = []
        channels = widths[0]
        for g, w in enumerate(widths):
            if g:
                stages.append(nn.MaxPool2d(2))
            blocks = []
            for _ in range(blocks_in[g]):
                blocks.append(DiracBlock(channels, w))
                channels = w
            stages.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*stages)
        self.relu = nn.ReLU()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max_pool0(self.bn(self.conv(x)))
        x = self.relu(self.groups(x))
        return self.fc(torch.flatten(self.avg_pool(x), 1))
