"""Op recognizers: one reading of every form a graph arrives in.

A graph from ``torch.fx.symbolic_trace`` calls modules (``call_module`` on an
``nn.Conv2d``), a Dynamo graph calls torch functions (``torch.conv2d``), and a
``torch.export`` graph calls aten overloads (``aten.conv2d.default``,
``aten._native_batch_norm_legit_no_training.default``, ...). Each recognizer takes a
node in any of these forms and returns one normalized description, or ``None``; passes are
written against these descriptions only. A node capture marked opaque (a module with hooks,
or one that overrides a standard layer's ``forward``) or one whose value may be written in
place (see :mod:`fxreparam.mutation`) is never recognized.

The package: :mod:`.targets` (which functions, aten overloads and module types mean what),
:mod:`.layers` (conv, linear, batch norm, arithmetic, affine, pooling and padding recognizers),
:mod:`.flow` (ops a value's channels pass through) and :mod:`.uses` (who reads a node, what work it is).
"""

from __future__ import annotations

from .flow import (
    channel_average,
    flatten_start,
    inference_identity,
    last_axis_reshape,
    sole_user,
    symmetric_crop,
    zero_keeping,
)
from .layers import (
    AvgPool,
    BatchNorm,
    Binary,
    ChannelAffine,
    Pad,
    avg_pool,
    batch_norm,
    binary,
    channel_affine,
    concat,
    constant_pad,
    conv,
    linear,
    mode_pad,
    weighted,
)
from .targets import aten, constant, opaque
from .uses import computed_kernel_conv, op_kind, reads_as_kernel, shape_query, value_users

__all__ = [
    "AvgPool",
    "BatchNorm",
    "Binary",
    "ChannelAffine",
    "Pad",
    "aten",
    "avg_pool",
    "batch_norm",
    "binary",
    "channel_affine",
    "channel_average",
    "computed_kernel_conv",
    "concat",
    "constant",
    "constant_pad",
    "conv",
    "flatten_start",
    "inference_identity",
    "last_axis_reshape",
    "linear",
    "mode_pad",
    "op_kind",
    "opaque",
    "reads_as_kernel",
    "shape_query",
    "sole_user",
    "symmetric_crop",
    "value_users",
    "weighted",
    "zero_keeping",
]
