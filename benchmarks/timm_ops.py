"""Ops executed per forward pass by timm's re-parameterizable models: training structure, after
fxreparam, after timm's hand-written ``reparameterize_model``; with the error and optimize time.

    python benchmarks/timm_ops.py [--models repvgg_a0 repvgg_b1 mobileone_s0 mobileone_s2] [--size 224]
"""

from __future__ import annotations

import argparse
import copy
import time
from datetime import date

import timm
import torch
from timm.utils.model import reparameterize_model

import fxreparam
from fxreparam.testing import executed_ops, randomize_batch_norms
from fxreparam.verify import relative_error


def executed(model: torch.nn.Module, x: torch.Tensor) -> str:
    c = executed_ops(model, x)
    return f"{c['conv']} / {c['batch_norm']} / {c['add']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["repvgg_a0", "repvgg_b1", "mobileone_s0", "mobileone_s2"])
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    print(f"# {date.today()}, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"timm {timm.__version__}, input 1x3x{args.size}x{args.size}, float32, random BN statistics")
    print("| model | conv / BN / add executed: training | fxreparam | timm reparameterize_model | "
          "rel. error (float32) | optimize s |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = randomize_batch_norms(timm.create_model(name, pretrained=False)).eval()
        x = torch.randn(1, 3, args.size, args.size)
        start = time.perf_counter()
        folded = fxreparam.optimize(model, x)
        seconds = time.perf_counter() - start
        by_hand = reparameterize_model(copy.deepcopy(model))
        with torch.no_grad():
            error = relative_error(model(x), folded(x))
        print(f"| {name} | {executed(model, x)} | {executed(folded, x)} | {executed(by_hand, x)} | {error:.1e} | "
              f"{seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
