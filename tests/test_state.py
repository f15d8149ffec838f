"""State is the user's: what optimize and the backend return start in the model's state and advance it as the
model would; verification never advances it, and the user's model is never touched."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms


class Counter(nn.Module):
    """A call counter used in the output: each call must see the count the original would."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return self.bn(self.conv(x)) * self.count


class Observer(nn.Module):
    """A running-mean observer (calibration style) whose estimate the output subtracts."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x):
        y = self.bn(self.conv(x))
        self.mean.mul_(0.9).add_(0.1 * y.mean((0, 2, 3)))
        return y - self.mean[:, None, None]


def _calls(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x) for x in inputs]


def _assert_same_run(original: nn.Module, result: nn.Module, names: tuple[str, ...]) -> None:
    """Three calls of ``result`` give ``original``'s outputs and leave its buffers as ``original``'s."""
    torch.manual_seed(1)
    inputs = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    for want, got in zip(_calls(original, inputs), _calls(result, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    theirs, ours = dict(original.named_buffers()), dict(getattr(result, "_orig_mod", result).named_buffers())
    for name in names:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("cls, names", [(Counter, ("count",)), (Observer, ("mean",))])
def test_optimize_starts_in_the_models_state_and_advances_it_as_the_model(cls, names, verify):
    torch.manual_seed(0)
    model = randomize_batch_norms(cls()).eval()
    untouched = copy.deepcopy(model)
    folded = fxreparam.optimize(model, torch.randn(2, 3, 8, 8), verify=verify)
    assert fxreparam.report(folded).after.batch_norm == 0
    for name in names:  # the user's model is never run
        torch.testing.assert_close(dict(model.named_buffers())[name], dict(untouched.named_buffers())[name])
    _assert_same_run(untouched, folded, names)


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("cls, names", [(Counter, ("count",)), (Observer, ("mean",))])
def test_the_backend_keeps_a_regions_buffer_writes_and_verification_never_advances_them(cls, names, dynamic):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize_batch_norms(cls()).eval()
    original = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxreparam", options={"inner": "eager"}, dynamic=dynamic)
    _assert_same_run(original, compiled, names)
    region = fxreparam.region_reports()[-1]
    assert region.after.batch_norm == 0 and region.verification.ok


def test_a_model_in_training_mode_is_compiled_unfolded_and_its_statistics_advance_once_per_call():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).train()
    original = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxreparam", options={"inner": "eager"})
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a training region is policy, not a failure: no warning
        torch.testing.assert_close(compiled(x), original(x))
    for (name, ours), theirs in zip(model.state_dict().items(), original.state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=name)
    assert int(model[1].num_batches_tracked) == 1
    region = fxreparam.region_reports()[-1]
    assert region.after.batch_norm == 1 and any("training mode" in n for n in region.notes)
