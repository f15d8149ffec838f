"""peft DoRA (``use_dora=True``, unmerged) on convs and on token Linears folds to at most ``merge_and_unload()``'s
executed ops and 1.05x its stored elements, exactly (the ``linear_combination`` pass)."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import fxreparam
from fxreparam.testing import executed_ops, randomize_batch_norms, stored_elements
from fxreparam.verify import relative_error

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean((2, 3)))


class _TokenMlp(nn.Module):
    """A transformer MLP block on tokens ``[B, N, C]``: the channels of every Linear are the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(12), nn.Linear(12, 24), nn.Linear(24, 12)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def _dora(base: nn.Module, targets: list[str], adapters: int = 1) -> nn.Module:
    """``base`` with ``adapters`` trained-looking (non-zero) DoRA adapters active at once on ``targets``."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(randomize_batch_norms(base)), config)
    names = ["default"] + [f"extra{i}" for i in range(1, adapters)]
    for name in names[1:]:
        model.add_adapter(name, replace(config, r=2, lora_alpha=4))
    model.base_model.set_adapter(names)
    return model.eval()


@pytest.mark.parametrize(("base", "targets", "shape"), [
    (_ConvNet, ["conv1", "conv2", "fc"], (2, 3, 8, 8)),
    (_TokenMlp, ["fc1", "fc2"], (2, 5, 12)),
], ids=["convs", "token-linears"])
@pytest.mark.parametrize("adapters", [1, 2])
def test_dora_folds_to_at_most_merge_and_unload(base, targets, shape, adapters):
    model, x = _dora(base(), targets, adapters), torch.randn(*shape)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    folded = fxreparam.optimize(model, x)
    got, want = executed_ops(folded, x), executed_ops(merged, x)
    for kind in ("conv", "linear", "batch_norm", "add", "macs"):
        assert got[kind] <= want[kind], (kind, got, want, str(fxreparam.report(folded)))
    assert stored_elements(folded) <= 1.05 * stored_elements(merged)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-5
