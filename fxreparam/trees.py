"""Input trees as every run of a model should see them: the one helper capture, verification and the API share."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["fresh_copies"]


def fresh_copies(tree: Any) -> Any:
    """Fresh copies of the tensors in ``tree``: a model that writes into its inputs must not change what the
    next run (the reference, the float64 reference, the candidate) reads."""
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)
