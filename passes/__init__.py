"""The built-in rewrite passes, one per module, each named like its file; importing this package registers
them (``fxreparam.list_passes()``; their order is :data:`fxreparam.pipeline.BUILTIN_ORDER`)."""

from . import (
    bn_conv,
    branch_sum,
    cleanup,
    concat_convs,
    conv_bn,
    fold_constants,
    identity,
    inference_identities,
    noop_casts,
    pool_as_conv,
    provisional,
    prune_zero_channels,
    sequential,
    zero_branches,
)

__all__ = [
    "bn_conv",
    "branch_sum",
    "cleanup",
    "concat_convs",
    "conv_bn",
    "fold_constants",
    "identity",
    "inference_identities",
    "noop_casts",
    "pool_as_conv",
    "provisional",
    "prune_zero_channels",
    "sequential",
    "zero_branches",
]
