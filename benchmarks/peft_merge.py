"""peft adapters (LoRA, DoRA; r=4) on every conv of a torchvision resnet18, unmerged as a user fine-tunes them:
stored elements, MACs per sample and op counts of the adapted model (fxreparam's input) against the folded result,
with the relative error. The whole-result guarantee: the folded model never costs more than its input.

    python benchmarks/peft_merge.py [--variants lora dora] [--size 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torchvision
from peft import LoraConfig, get_peft_model

import fxreparam
from fxreparam.testing import randomize_batch_norms, stored_elements
from fxreparam.verify import relative_error


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["lora", "dora"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    lines = [f"peft adapters (r=4) on every conv of resnet18 at 1x3x{args.size}x{args.size}, torch "
             f"{torch.__version__}, CPU: adapted model -> fxreparam", "",
             "| adapter | stored elements | MACs per sample | conv | BN | elementwise | rel. error | optimize |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             *[row(v, args.size) for v in args.variants]]
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
