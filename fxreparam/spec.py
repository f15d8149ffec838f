"""One description of a layer: a frozen spec (everything but the kernel) plus a kernel.

``ConvSpec`` and ``LinearSpec`` answer the same questions (groups, transposed, channel axis),
so a fold on either side of an affine map is straight-line code; variants are made with
``dataclasses.replace(spec, groups=g)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from .meta import Storage

__all__ = ["ConvSpec", "Layer", "LinearSpec", "Spec"]


@dataclass(frozen=True)
class ConvSpec:
    """A convolution's hyperparameters: ``conv(x; W, b, stride, padding, dilation, groups, ...)``."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    padding_mode: str = "zeros"

    @property
    def dims(self) -> int:
        """The number of spatial dims (1, 2 or 3)."""
        return len(self.stride)

    def channel_dim(self, ndim: int) -> int:
        """The channel axis of an ``ndim``-d input or output: 1 when batched, 0 when unbatched."""
        return 1 if ndim == self.dims + 2 else 0

    def pointwise(self, kernel_size: tuple[int, ...]) -> bool:
        """Whether a kernel of this size is a per-pixel channel mix (1x1, stride 1, no padding)."""
        return all(k == 1 for k in kernel_size) and all(s == 1 for s in self.stride) and not any(self.padding)


@dataclass(frozen=True)
class LinearSpec:
    """A linear layer ``x @ W.T + b``: channels on the last axis, one group, never transposed."""

    groups: ClassVar[int] = 1
    transposed: ClassVar[bool] = False
    dims: ClassVar[int] = 0

    def channel_dim(self, ndim: int) -> int:
        """The feature axis: the last one."""
        return ndim - 1


Spec = ConvSpec | LinearSpec


@dataclass(frozen=True)
class Layer:
    """A conv or linear node of the graph whose weight and bias are stored tensors."""

    node: fx.Node
    input: fx.Node
    spec: Spec
    weight: torch.Tensor
    bias: torch.Tensor | None
    name: str = ""

    @property
    def is_conv(self) -> bool:
        return isinstance(self.spec, ConvSpec)

    @property
    def groups(self) -> int:
        return self.spec.groups

    @property
    def transposed(self) -> bool:
        return self.spec.transposed

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups if self.transposed else self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1] * self.groups

    @property
    def storage(self) -> Storage:
        """The dtype and device its folded kernels are stored in."""
        return self.weight.dtype, self.weight.device

    @property
    def kind(self) -> str:
        return "conv" if self.is_conv else "linear"
