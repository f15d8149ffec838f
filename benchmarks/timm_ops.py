"""What timm's re-parameterizable models execute per forward pass: the training structure, after fxreparam, and
after timm's hand-written ``reparameterize_model``. Op counts, stored weights and multiply-accumulates (MACs, per
sample, counted from the ops actually executed), the error and the optimize time.

    python benchmarks/timm_ops.py [--models repvgg_a0 levit_128s ...] [--size 224]
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
from fxreparam.testing import executed_ops, randomize_batch_norms, stored_elements
from fxreparam.verify import relative_error

FAMILIES = ["repvgg_a0", "repvgg_b1", "mobileone_s0", "mobileone_s2", "fastvit_t8", "levit_128s", "efficientvit_m0",
            "repvit_m1_1", "repghostnet_100", "ghostnetv3_100", "efficientformerv2_s0"]


def measure(model: torch.nn.Module, x: torch.Tensor) -> tuple[str, int, int]:
    """``conv / linear / BN / add`` executed, stored elements, MACs per sample."""
    c = executed_ops(model, x)
    return f"{c['conv']} / {c['linear']} / {c['batch_norm']} / {c['add']}", stored_elements(model), c["macs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=FAMILIES)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    print(f"# {date.today()}, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"timm {timm.__version__}, input 1x3x{args.size}x{args.size}, float32, random BN statistics")
    print("# ops = conv / linear / BN / add executed; weights = stored floating-point elements; MACs per sample")
    print("| model | ops: training | fxreparam | timm | weights: training | fxreparam | timm (ratio) | "
          "MACs: training | fxreparam | timm (ratio) | rel. error | optimize s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
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
        rows = [measure(m, x) for m in (model, folded, by_hand)]
        ops, weights, macs = zip(*rows)
        print(f"| {name} | {' | '.join(ops)} | {weights[0]:,} | {weights[1]:,} | {weights[2]:,} "
              f"({weights[1] / weights[2]:.3f}) | {macs[0]:,} | {macs[1]:,} | {macs[2]:,} ({macs[1] / macs[2]:.3f}) | "
              f"{error:.1e} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
