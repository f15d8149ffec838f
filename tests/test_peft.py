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


def _merge_measures():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import peft_merge

    return peft_merge


def _small_vit() -> tuple[nn.Module, torch.Tensor]:
    """A 2-block timm ViT at 32x32 pixels (the benchmark's vit_tiny, small enough for seconds), biases non-zero."""
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    model = vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                                 num_classes=10)
    return _merge_measures().trained_biases(model).eval(), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize(("r", "adapters"), [(4, 1), (8, 2)])
def test_lora_on_a_vit_folds_to_merge_and_unload(r, adapters):
    """Each LoRA product is composed and summed into its base Linear (issue 22): no more ops than peft's own
    merge, at most 1.05x its stored elements, exact."""
    pm = _merge_measures()
    base, x = _small_vit()
    m = pm.measure_merge(pm.with_lora(base, pm.VIT_TARGETS, r, adapters), x)
    (adapted, merged, folded), (_, merged_elements, folded_elements) = m.ops, m.elements
    assert adapted["linear"] > merged["linear"] == 9  # 2 blocks x (qkv, proj, fc1, fc2) and the head
    assert (folded["linear"], folded["conv"]) <= (merged["linear"], merged["conv"]), (m.ops, m.elements)
    assert folded["macs"] <= merged["macs"] and folded_elements <= 1.05 * merged_elements, (m.ops, m.elements)
    assert m.errors[1] < 1e-5


def test_two_lora_adapters_on_a_linear_bn_mlp_fold_to_merge_and_unload():
    pm = _merge_measures()
    base, x = pm.mlp()
    m = pm.measure_merge(pm.with_lora(base, ["fcs.0", "fcs.1", "fcs.2", "fcs.3"], 8, 2), x)
    (adapted, merged, folded), (_, merged_elements, folded_elements) = m.ops, m.elements
    assert (adapted["linear"], merged["linear"], folded["linear"]) == (20, 4, 4)
    assert folded["batch_norm"] == 0 and folded_elements <= 1.05 * merged_elements and m.errors[1] < 1e-5
