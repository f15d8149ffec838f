"""The built-in rewrite passes; importing this package registers them (``fxreparam.list_passes()``)."""

from . import bn_conv, branch_sum, cleanup, conv_bn, dirac, linear_bn, prune, sequential

__all__ = ["bn_conv", "branch_sum", "cleanup", "conv_bn", "dirac", "linear_bn", "prune", "sequential"]
