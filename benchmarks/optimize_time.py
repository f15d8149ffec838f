"""Capture and optimize time against depth, for DiracNet-style plain nets.

Prints one row per depth: capture (torch.export) seconds, pass-pipeline seconds,
verification seconds and total; the pipeline must grow linearly with depth.

    python benchmarks/optimize_time.py [--depths 100 250 500 1000] [--width 0.125]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

import fxreparam
from fxreparam.demo import DiracNet
from fxreparam.testing import randomize_batch_norms


def measure(depth: int, width: float, size: int) -> dict[str, float]:
    model = randomize_batch_norms(DiracNet(depth=depth, width=width, num_classes=10)).eval()
    x = torch.randn(1, 3, size, size)
    start = time.perf_counter()
    folded = fxreparam.optimize(model, x, verify=False)
    total_unverified = time.perf_counter() - start
    rep = fxreparam.report(folded)
    start = time.perf_counter()
    verified = fxreparam.report(fxreparam.optimize(model, x))
    total_verified = time.perf_counter() - start
    return {
        "depth": depth,
        "nodes": rep.before.conv + rep.before.batch_norm + rep.before.add_sub + rep.before.mul_div + rep.before.other,
        "capture": rep.capture_seconds,
        "passes": sum(p.seconds for p in rep.passes),
        "optimize": total_unverified,
        "verified": total_verified,
        "error": verified.verification.error,
        "convs_after": rep.after.conv,
        "bn_after": rep.after.batch_norm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[100, 250, 500, 1000])
    parser.add_argument("--width", type=float, default=0.125, help="group widths are 64, 128, 256, 512 times this")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"# fxreparam optimize time vs depth - {date.today()} - {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# DiracNet-style plain net, width {args.width}, input 1x3x{args.size}x{args.size}, float32, CPU")
    header = ("depth", "graph ops", "capture s", "passes s", "optimize s", "+verify s", "ms/layer", "rel err", "convs",
              "BNs left")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for depth in args.depths:
        r = measure(depth, args.width, args.size)
        print(f"| {depth} | {r['nodes']} | {r['capture']:.2f} | {r['passes']:.2f} | {r['optimize']:.2f} | "
              f"{r['verified']:.2f} | {1000 * r['optimize'] / depth:.1f} | {r['error']:.1e} | {r['convs_after']} | "
              f"{r['bn_after']} |", flush=True)


if __name__ == "__main__":
    main()
