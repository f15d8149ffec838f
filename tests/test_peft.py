"""peft adapters on convs and linears (LoRA and DoRA, unmerged, as a user fine-tunes them): folded without ever
costing more than the adapted model it was given, exact, and the casts peft adds never block a BN fold."""

import pytest
import torch
from torch import nn

import fxreparam
from fxreparam import cost
from fxreparam.testing import randomize_batch_norms
from fxreparam.verify import relative_error

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean((2, 3)))


def _adapted(dora: bool) -> nn.Module:
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "fc"], use_dora=dora,
                             init_lora_weights=False)
    return peft.get_peft_model(randomize_batch_norms(_Net()), config).eval()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapter_never_costs_more_than_the_adapted_model(dora):
    model, x = _adapted(dora), torch.randn(2, 3, 8, 8)
    folded = fxreparam.optimize(model, x)
    rep = fxreparam.report(folded)
    budget = cost.precompute_budget(rep.before.parameters)  # precomputed constants (DoRA's weight norms) may add this
    assert rep.after.parameters <= rep.before.parameters + budget and rep.after.macs <= rep.before.macs, str(rep)
    assert rep.after.conv <= rep.before.conv and rep.after.linear <= rep.before.linear
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-5


def test_lora_casts_do_not_block_the_batch_norm_folds():
    model = _adapted(dora=False)
    rep = fxreparam.report(fxreparam.optimize(model, torch.randn(2, 3, 8, 8)))
    assert rep.after.batch_norm == 0, str(rep)
