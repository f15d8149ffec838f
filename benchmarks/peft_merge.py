"""peft adapters, unmerged as a user fine-tunes them, folded by fxreparam.

1. LoRA and DoRA (r=4) on every conv of a torchvision resnet18: stored elements, MACs per sample and op counts of
   the adapted model (fxreparam's input) against the folded result, with the relative error. The whole-result
   guarantee: the folded model never costs more than its input.
2. LoRA (r=4 and 8, one and two adapters active at once) on the Linear layers of a timm ViT and of a Linear-BN1d
   MLP: executed linear ops, stored elements, MACs and relative error of fxreparam's result against peft's own
   ``merge_and_unload()`` (on a copy). Issue 22's target: at most its ops and 1.05x its elements, error < 1e-5.

    python benchmarks/peft_merge.py [--tables resnet linear] [--variants lora dora] [--size 64] [--vit-size 64]
                                    [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
import torchvision
from peft import LoraConfig, get_peft_model
from torch import nn

import fxreparam
from fxreparam.testing import executed_ops, randomize_batch_norms, stored_elements
from fxreparam.verify import relative_error

VIT = "vit_tiny_patch16_224"
VIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]  # peft's usual ViT targets; "proj" also names the patch embedding conv


def adapted(variant: str) -> torch.nn.Module:
    """resnet18 with random BN statistics and a trained-looking (non-zero) adapter of ``variant`` on every conv."""
    torch.manual_seed(0)
    base = randomize_batch_norms(torchvision.models.resnet18()).eval()
    convs = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=convs, use_dora=variant == "dora", init_lora_weights=False)
    return get_peft_model(copy.deepcopy(base), config).eval()


def row(variant: str, size: int) -> str:
    model, x = adapted(variant), torch.randn(1, 3, size, size)
    start = time.perf_counter()
    folded = fxreparam.optimize(model, x)
    seconds = time.perf_counter() - start
    rep = fxreparam.report(folded)
    with torch.no_grad():
        error = relative_error(model(x), folded(x))
    b, a = rep.before, rep.after
    return (f"| {variant} | {stored_elements(model):,} -> {stored_elements(folded):,} "
            f"({a.parameters / b.parameters:.3f}x) | {b.macs:,} -> {a.macs:,} ({a.macs / b.macs:.3f}x) | "
            f"{b.conv} -> {a.conv} | {b.batch_norm} -> {a.batch_norm} | {b.add_sub + b.mul_div} -> "
            f"{a.add_sub + a.mul_div} | {error:.1e} | {seconds:.0f} s |")


def with_lora(base: nn.Module, targets: list[str], r: int, adapters: int) -> nn.Module:
    """``base`` (copied) with ``adapters`` trained-looking (non-zero) LoRA adapters of rank ``r`` on ``targets``, all
    active at once, in eval mode."""
    torch.manual_seed(0)
    config = {"r": r, "lora_alpha": 2 * r, "target_modules": targets, "init_lora_weights": False}
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    names = ["default"] + [f"extra{i}" for i in range(1, adapters)]
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**config))
    model.base_model.set_adapter(names)
    return model.eval()


class LinearBN(nn.Module):
    """An MLP of Linear-BN1d-ReLU blocks and a Linear head (the issue's two-adapter case)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 64, 64, 10)) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.bns = nn.ModuleList(nn.BatchNorm1d(b) for b in widths[1:-1])

    def forward(self, x):
        for fc, bn in zip(self.fcs, self.bns):
            x = torch.relu(bn(fc(x)))
        return self.fcs[-1](x)


@torch.no_grad()
def trained_biases(model: nn.Module) -> nn.Module:
    """Give every all-zero bias of ``model`` small random values, in place: timm initializes them to zero, a trained
    model's are not, and an all-zero bias is not stored after folding (which would flatter the element counts)."""
    for mod in model.modules():
        bias = getattr(mod, "bias", None)
        if isinstance(bias, nn.Parameter) and not bias.any():
            bias.normal_(0.0, 0.02)
    return model


def vit(size: int) -> tuple[nn.Module, torch.Tensor]:
    """timm's ``vit_tiny_patch16_224`` (random weights, non-zero biases) at ``size`` x ``size`` pixels, one input."""
    import timm

    torch.manual_seed(0)
    model = trained_biases(timm.create_model(VIT, pretrained=False, img_size=size))
    return model.eval(), torch.randn(1, 3, size, size)


def mlp() -> tuple[nn.Module, torch.Tensor]:
    """:class:`LinearBN` with random BN statistics, and a batch of inputs."""
    torch.manual_seed(0)
    return randomize_batch_norms(LinearBN()).eval(), torch.randn(8, 32)


@dataclass(frozen=True)
class Merge:
    """One adapted model measured three ways: as given, after peft's ``merge_and_unload()``, after fxreparam."""

    ops: tuple[dict[str, int], dict[str, int], dict[str, int]]  # executed ops: adapted, merged, folded
    elements: tuple[int, int, int]
    errors: tuple[float, float]  # relative error of merged and folded against the adapted model
    seconds: float


def measure_merge(model: nn.Module, x: torch.Tensor) -> Merge:
    """Fold the adapted ``model`` with fxreparam and merge a copy of it with ``merge_and_unload()``; measure both."""
    merged = copy.deepcopy(model).merge_and_unload().eval()
    start = time.perf_counter()
    folded = fxreparam.optimize(model, x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        want = model(x)
        errors = (relative_error(want, merged(x)), relative_error(want, folded(x)))
    models = (model, merged, folded)
    return Merge(tuple(executed_ops(m, x) for m in models), tuple(stored_elements(m) for m in models), errors,
                 seconds)


def merge_row(label: str, r: int, adapters: int, m: Merge) -> str:
    """One markdown row of the LoRA table: each count as adapted -> merge_and_unload / fxreparam."""
    (a, g, f), (ea, eg, ef) = m.ops, m.elements
    counts = " | ".join(f"{a[k]} -> {g[k]} / {f[k]}" for k in ("linear", "conv", "batch_norm"))
    return (f"| {label} | {r} | {adapters} | {counts} | {ea:,} -> {eg:,} / {ef:,} ({ef / eg:.3f}x) | "
            f"{g['macs']:,} / {f['macs']:,} | {m.errors[0]:.1e} / {m.errors[1]:.1e} | {m.seconds:.0f} s |")


def lora_table(vit_size: int) -> list[str]:
    """The LoRA-on-Linear table: ViT and MLP, r=4 and 8, one and two adapters."""
    rows = []
    for label, (base, x), targets in [(f"{VIT} @{vit_size}", vit(vit_size), VIT_TARGETS),
                                      ("Linear-BN1d MLP", mlp(), ["fcs.0", "fcs.1", "fcs.2", "fcs.3"])]:
        for r in (4, 8):
            for adapters in (1, 2):
                rows.append(merge_row(label, r, adapters, measure_merge(with_lora(base, targets, r, adapters), x)))
    return [f"peft LoRA on Linear layers (ViT targets {', '.join(VIT_TARGETS)}; every Linear of the MLP), torch "
            f"{torch.__version__}, CPU: adapted -> merge_and_unload() / fxreparam (executed ops)", "",
            "| model | r | adapters | linear ops | conv ops | BN ops | stored elements | MACs per sample | "
            "rel. error | optimize |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
            "merge_and_unload() keeps the model's BatchNorm layers; fxreparam also folds them into the Linears."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", default=["resnet", "linear"], choices=["resnet", "linear"])
    parser.add_argument("--variants", nargs="+", default=["lora", "dora"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--vit-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    lines: list[str] = [f"Measured {date.today().isoformat()} on CPU.", ""]
    if "resnet" in args.tables:
        lines += [f"peft adapters (r=4) on every conv of resnet18 at 1x3x{args.size}x{args.size}, torch "
                  f"{torch.__version__}, CPU: adapted model -> fxreparam", "",
                  "| adapter | stored elements | MACs per sample | conv | BN | elementwise | rel. error | optimize |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|",
                  *[row(v, args.size) for v in args.variants]]
    if "linear" in args.tables:
        lines += [""] * ("resnet" in args.tables) + lora_table(args.vit_size)
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
