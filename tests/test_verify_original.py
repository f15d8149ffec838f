"""Verification of an original that does not run on its own example inputs: a VerificationError naming the cause
(issue 21: RT-DETR-l, its anchor cache left inconsistent, raised a bare RuntimeError from verify.Reference)."""

import math

import pytest
import torch
from torch import nn

from fxreparam.errors import FxReparamError, VerificationError
from fxreparam.verify import Reference


class _Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.empty(0)


def test_an_original_that_raises_on_its_example_is_a_verification_error_naming_it():
    with pytest.raises(VerificationError, match=r"_Broken itself raised RuntimeError on its example inputs "
                                                r"\(\(1, 3\)\)") as caught:
        Reference(_Broken(), (torch.randn(1, 3),))
    assert isinstance(caught.value, FxReparamError) and caught.value.pass_name is None
    assert math.isnan(caught.value.error) and isinstance(caught.value.__cause__, RuntimeError)
