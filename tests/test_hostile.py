"""Hostile and awkward models, and the invariants optimize keeps whatever happens."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms


def conv_bn(cin=4, cout=4, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout))


class RepBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(), conv_bn(k=1)

    def forward(self, x):
        return F.relu(self.a(x) + self.b(x))


def test_in_place_ops_fold_correctly():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = conv_bn(), conv_bn(k=1), nn.BatchNorm2d(4)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.c(x)
            out += self.a(x)
            out += self.b(x)
            return self.act(out)

    model = randomize_batch_norms(InPlace()).eval()
    x = torch.randn(2, 4, 8, 8)
    for capture in ("export", "symbolic_trace"):
        folded = fxreparam.optimize(model, x, capture=capture)
        assert rel_err(model(x), folded(x)) < 1e-5
    assert fxreparam.report(folded).after.conv == 1


def test_in_place_activation_on_a_shared_tensor_is_not_folded_past():
    class Mutating(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            z = self.bn(y)
            F.relu(y, inplace=True)  # mutates y after bn read it; y is returned too
            return z, y

    model = randomize_batch_norms(Mutating()).eval()
    x = torch.randn(2, 4, 6, 6)
    for capture in ("export", "symbolic_trace"):
        folded = fxreparam.optimize(model, x, capture=capture)
        assert rel_err(model(x), folded(x)) < 1e-5


def test_parameters_shared_between_branches():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(), conv_bn()
            self.b[0].weight = self.a[0].weight  # one kernel, two branches

        def forward(self, x):
            return self.a(x) + self.b(x) + self.a[0](x)

    model = randomize_batch_norms(Shared()).eval()
    x = torch.randn(2, 4, 6, 6)
    folded = fxreparam.optimize(model, x)
    assert rel_err(model(x), folded(x)) < 1e-5
    assert fxreparam.report(folded).after.conv == 1


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_models_fold_in_float64_and_cast_back(dtype, bound):
    model = randomize_batch_norms(nn.Sequential(RepBlock(), RepBlock())).eval().to(dtype)
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    folded = fxreparam.optimize(model, x)
    assert all(p.dtype == dtype for p in folded.parameters())
    assert folded(x).dtype == dtype
    reference = copy.deepcopy(model).double()(x.double())
    # The folded kernels are rounded to the model's dtype once; the unfolded model rounds at every op.
    assert rel_err(reference, folded(x).double()) < bound
    assert rel_err(reference, folded(x).double()) <= 2 * rel_err(reference, model(x).double()) + 1e-3


def test_channels_last_inputs():
    model = randomize_batch_norms(nn.Sequential(RepBlock(), RepBlock())).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    folded = fxreparam.optimize(model, x)
    assert rel_err(model(x), folded(x)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_model_folds_on_its_device():
    model = randomize_batch_norms(nn.Sequential(RepBlock(), RepBlock())).eval().cuda()
    x = torch.randn(2, 4, 8, 8, device="cuda")
    folded = fxreparam.optimize(model, x)
    assert all(p.device.type == "cuda" for p in folded.parameters())
    assert rel_err(model(x), folded(x)) < 1e-5


def test_keyword_arguments():
    class WithKwargs(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = RepBlock()

        def forward(self, x, *, scale: float = 1.0, bias=None):
            y = self.block(x) * scale
            return y + bias if bias is not None else y

    model = randomize_batch_norms(WithKwargs()).eval()
    x, b = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    folded = fxreparam.optimize(model, x, example_kwargs={"bias": b})
    assert rel_err(model(x, bias=b), folded(x, bias=b)) < 1e-5
    assert fxreparam.report(folded).after.batch_norm == 0


def test_deleting_the_original_frees_it():
    model = randomize_batch_norms(nn.Sequential(RepBlock(), RepBlock())).eval()
    x = torch.randn(1, 4, 6, 6)
    folded = fxreparam.optimize(model, x)
    probe = weakref.ref(model[0].a[0].weight)
    del model
    gc.collect()
    assert probe() is None
    assert folded(x).shape == (1, 4, 6, 6)


def test_failed_verification_leaves_nothing_half_applied():
    @fxreparam.register_pass("negate_convs", "deliberately wrong, for this test", after="sequential")
    def negate_convs(ctx, node):  # negates one conv per graph (once: a second negation would undo the first)
        layer = fxreparam.ops.conv(ctx.gm, node)
        if layer is None or getattr(ctx.gm, "_negated", False):
            return False
        ctx.gm._negated = True
        fxreparam.emit(ctx.gm, layer.spec, -layer.weight, layer.bias, input=layer.input, replaces=node,
                       storage=layer.storage)
        return True

    model = randomize_batch_norms(nn.Sequential(RepBlock())).eval()
    before = copy.deepcopy(model.state_dict())
    try:
        with pytest.raises(fxreparam.VerificationError) as info:
            fxreparam.optimize(model, torch.randn(1, 4, 6, 6))
        assert info.value.pass_name == "negate_convs"
    finally:
        fxreparam.unregister_pass("negate_convs")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and not hasattr(model, "fxreparam_report")


def test_branches_of_a_tensor_modified_in_place_between_them_are_not_merged():
    class Between(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            x = x * 1.0  # a tensor of the model's own, so the in-place write stays inside
            a = self.a(x)
            F.relu(x, inplace=True)
            return a + self.b(x)

    model = Between().eval()
    x = torch.randn(2, 4, 6, 6)
    for capture in ("export", "symbolic_trace"):
        folded = fxreparam.optimize(model, x, capture=capture)
        assert rel_err(model(x), folded(x)) < 1e-5


def test_a_conv_input_written_in_place_before_the_bn_reads_the_same_value():
    class Later(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            x = x * 1.0
            y = self.conv(x)
            F.relu(x, inplace=True)
            return self.bn(y) + x

    model = randomize_batch_norms(Later()).eval()
    x = torch.randn(2, 4, 6, 6)
    for capture in ("export", "symbolic_trace"):
        folded = fxreparam.optimize(model, x, capture=capture)
        assert rel_err(model(x), folded(x)) < 1e-5
        assert fxreparam.report(folded).after.batch_norm == 0
