"""Decomposed depthwise kernels (RepNeXt-style: a kxk summed with 1xk -> kx1 pairs, asymmetric kernels, a dilated
one, BN branches and a residual) fold through ``fxreparam.optimize`` to one conv per block, never larger than the
training form, exact; a lone separable pair that no kxk absorbs stays two convs and is listed as declined."""

import torch
from torch import nn

import fxreparam
from fxreparam.testing import executed_ops, randomize_batch_norms, stored_elements
from fxreparam.verify import relative_error


def _dw(c: int, k, stride=1, padding=0, dilation=1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c, c, k, stride=stride, padding=padding, dilation=dilation, groups=c, bias=bias)


class _Decomposed(nn.Module):
    """``x -> bn(dw_7x7(x)) + dw_5x3(x) + dw_3x5(x) + dw_7x1(dw_1x7(x)) + bn(dw_5x1(dw_1x5(x))) [+ bn(x) + x]``."""

    def __init__(self, c: int, stride: int = 1) -> None:
        super().__init__()
        s = stride
        self.k7 = nn.Sequential(_dw(c, 7, s, 3), nn.BatchNorm2d(c))
        self.k53, self.k35 = _dw(c, (5, 3), s, (2, 1), bias=True), _dw(c, (3, 5), s, (1, 2), bias=True)
        self.w7, self.h7 = _dw(c, (1, 7), (1, s), (0, 3)), _dw(c, (7, 1), (s, 1), (3, 0))
        self.w5, self.h5 = _dw(c, (1, 5), (1, s), (0, 2)), nn.Sequential(_dw(c, (5, 1), (s, 1), (2, 0)),
                                                                        nn.BatchNorm2d(c))
        self.bn = nn.BatchNorm2d(c) if stride == 1 else None

    def forward(self, x):
        y = self.k7(x) + self.k53(x) + self.k35(x) + self.h7(self.w7(x)) + self.h5(self.w5(x))
        return y + self.bn(x) + x if self.bn is not None else y


class _Small(nn.Module):
    """``x -> dw_3x3(x) + dw_3x1(dw_1x3(x)) + dw_2x2_dilated(x)``, strided (the 1x3 strides along its own axis)."""

    def __init__(self, c: int, stride: int = 2) -> None:
        super().__init__()
        s = stride
        self.k3 = _dw(c, 3, s, 1, bias=True)
        self.w, self.h = _dw(c, (1, 3), (1, s), (0, 1)), _dw(c, (3, 1), (s, 1), (1, 0))
        self.k2 = _dw(c, 2, s, 1, dilation=2, bias=True)

    def forward(self, x):
        return self.k3(x) + self.h(self.w(x)) + self.k2(x)


def _stack() -> nn.Module:
    torch.manual_seed(0)
    c = 8
    blocks = [_Decomposed(c), _Small(c), _Decomposed(c), _Decomposed(c, stride=2), _Small(c, stride=1)]
    return randomize_batch_norms(nn.Sequential(*[nn.Sequential(b, nn.GELU()) for b in blocks])).eval()


def test_decomposed_depthwise_stack_folds_to_one_conv_per_block():
    model, x = _stack(), torch.randn(2, 8, 24, 24)
    folded = fxreparam.optimize(model, x)
    ops = executed_ops(folded, x)
    assert executed_ops(model, x)["conv"] == 29  # 3 x 7 + 2 x 4
    assert (ops["conv"], ops["batch_norm"], ops["add"]) == (5, 0, 0)
    assert stored_elements(folded) <= stored_elements(model)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-5


class _LonePair(nn.Module):
    """A 1x11 then 11x1 depthwise pair with nothing of its input summed beside it (composing it is 121 taps for 22)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.w, self.h = _dw(c, (1, 11), 1, (0, 5), bias=True), _dw(c, (11, 1), 1, (5, 0), bias=True)

    def forward(self, x):
        return self.h(self.w(x))


def test_lone_separable_pair_stays_and_is_listed():
    model, x = _LonePair().eval(), torch.randn(2, 8, 16, 16)
    folded = fxreparam.optimize(model, x)
    assert executed_ops(folded, x)["conv"] == 2 and stored_elements(folded) == stored_elements(model)
    refusals = [r for r in fxreparam.report(folded).refusals if r.pass_name == "sequential"]
    assert len(refusals) == 1 and "bias" in refusals[0].reason  # the 1x11's bias flows into the 11x1's padding
