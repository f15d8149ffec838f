"""Training-time structure for any model: RepVGG, ACNet, DBB or MobileOne blocks in place of its convs.

``fxreparam.expand(model, style)`` returns a copy whose convs are training-time blocks
(:mod:`fxreparam.expand.blocks`) computing exactly the model's function at initialization;
after training, ``fxreparam.optimize(expanded.eval(), x)`` folds every block back into one conv.
"""

from __future__ import annotations

from .blocks import ACBlock, BNAndPad, ConvBN, DiverseBranchBlock, MobileOneBlock, RepVGGBlock
from .rewrite import STYLES, expand

__all__ = ["STYLES", "ACBlock", "BNAndPad", "ConvBN", "DiverseBranchBlock", "MobileOneBlock", "RepVGGBlock", "expand"]
