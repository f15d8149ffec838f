"""The built-in rewrite passes; importing this package registers them (``fxreparam.list_passes()``)."""

from . import bn_conv, cleanup, conv_bn, dirac, linear_bn

__all__ = ["bn_conv", "cleanup", "conv_bn", "dirac", "linear_bn"]
