"""Capture and optimize time against depth, for DiracNet-style plain nets.

Prints one row per capture path and depth: capture seconds, pass-pipeline seconds, the
whole optimize call, and the verification on top (per channel, against float64); all must grow linearly with depth.

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
from fxreparam.testing import calibrate_batch_norms
from fxreparam.verify import verify


def measure(depth: int, width: float, size: int, capture: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = DiracNet(depth=depth, width=width, num_classes=10)
    # Calibrated statistics keep a 1000-layer plain net finite; random ones would overflow it.
    calibrate_batch_norms(model, torch.randn(4, 3, size, size)).eval()
    x = torch.randn(1, 3, size, size)
    start = time.perf_counter()
    folded = fxreparam.optimize(model, x, capture=capture, verify=False)
    total = time.perf_counter() - start
    rep = fxreparam.report(folded)
    start = time.perf_counter()
    check = verify(model, folded, (x,))
    return {
        "nodes": sum(rep.before.as_dict()[k] for k in ("conv", "linear", "batch_norm", "add_sub", "mul_div", "other")),
        "capture": rep.capture_seconds,
        "passes": sum(p.seconds for p in rep.passes),
        "total": total,
        "verify": time.perf_counter() - start,
        "error": check.error,
        "convs": rep.after.conv,
        "bns": rep.after.batch_norm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[100, 250, 500, 1000])
    parser.add_argument("--width", type=float, default=0.125, help="group widths are 64, 128, 256, 512 times this")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--capture", nargs="+", default=["symbolic_trace", "export"],
                        choices=["symbolic_trace", "export"], help="capture paths to time")
    args = parser.parse_args()
    print(f"# fxreparam optimize time vs depth - {date.today()} - {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# DiracNet-style plain net, width {args.width}, input 1x3x{args.size}x{args.size}, float32, CPU")
    print("# optimize s = capture + passes + finalize (verify=False); verify s = the check on top")
    header = ("capture with", "depth", "graph ops", "capture s", "passes s", "optimize s", "passes ms/layer",
              "verify s", "worst channel err", "convs", "BNs left")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for capture in args.capture:
        for depth in args.depths:
            r = measure(depth, args.width, args.size, capture)
            print(f"| {capture} | {depth} | {r['nodes']} | {r['capture']:.2f} | {r['passes']:.2f} | {r['total']:.2f} | "
                  f"{1000 * r['passes'] / depth:.2f} | {r['verify']:.2f} | {r['error']:.1e} | {r['convs']} | "
                  f"{r['bns']} |", flush=True)


if __name__ == "__main__":
    main()
