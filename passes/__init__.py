"""The built-in rewrite passes, one per module, each named like its file; importing this package registers
them (``fxreparam.list_passes()``) and declares :data:`BUILTIN_ORDER`, the one list of the order they run in.
Adding a pass is one file, one test and one line here."""

from fxreparam.registry import set_builtin_order

from . import (
    bn_conv,
    branch_sum,
    channel_layout,
    channel_slices,
    cleanup,
    concat_convs,
    conv_bn,
    fold_constants,
    identity,
    inference_identities,
    linear_combination,
    noop_casts,
    pool_as_conv,
    provisional,
    prune_zero_channels,
    sequential,
    zero_branches,
)

__all__ = [
    "BUILTIN_ORDER",
    "bn_conv",
    "branch_sum",
    "channel_layout",
    "channel_slices",
    "cleanup",
    "concat_convs",
    "conv_bn",
    "fold_constants",
    "identity",
    "inference_identities",
    "linear_combination",
    "noop_casts",
    "pool_as_conv",
    "provisional",
    "prune_zero_channels",
    "sequential",
    "zero_branches",
]

BUILTIN_ORDER: tuple[str, ...] = (
    "inference_identities",  # dropout in eval, nn.Identity -> gone
    "noop_casts",            # casts to the dtype and device a value has -> gone
    "zero_branches",         # summed terms of all-zero layers (an untrained LoRA B) -> gone
    "fold_constants",        # parameter-only subgraphs (Dirac, weight norm, parametrize, anchor grids) -> stored
    "channel_layout",        # per-channel affine after a conv/linear and permute/view/flatten -> into its kernel
    "channel_slices",        # identity / BN / conv parts on channel slices of one tensor, cat or summed -> one layer
    "conv_bn",               # per-channel affine after a conv or linear layer -> into its kernel
    "bn_conv",               # per-channel affine before a conv or linear layer -> into its kernel, where exact
    "pool_as_conv",          # exact average pool before a per-channel affine -> depthwise conv
    "sequential",            # 1x1-kxk, kxk-1x1, linear-linear pairs -> one layer
    "branch_sum",            # summed conv / BN / pool branches of one input -> one conv
    "identity",              # x + f(x) -> f's conv with a Dirac kernel added
    "linear_combination",    # sum c_i * f_i(x) with a layer read twice or a chain (DoRA) -> one layer; after
                             # branch_sum and identity so plain sums keep their rules, and conv_bn runs on its
                             # result in the next round
    "concat_convs",          # convs of one input concatenated on channels -> one conv
    "prune_zero_channels",   # all-zero output channels -> removed with the inputs that read them
    "cleanup",               # dead nodes and unread tensors -> gone
    "settle_provisional",    # compositions made for a sum that did not fold, at a fixpoint -> their two layers
)
"""The order the built-in passes run in, each round."""

set_builtin_order(BUILTIN_ORDER)
