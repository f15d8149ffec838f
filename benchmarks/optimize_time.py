"""What ``fxreparam.optimize`` costs: against ``torch.export`` alone on real models, and against depth.

First, for resnet50, timm repvgg_b1 and mobileone_s0 at 1x3x224x224, one thread: ``torch.export`` alone, then
the whole ``optimize`` call (capture, passes, verification included) and its parts, and the ratio
optimize / export. Then one row per capture path and depth of a DiracNet-style plain net: capture seconds,
pass-pipeline seconds, the whole optimize call, and the verification on top; all must grow linearly with depth.

    python benchmarks/optimize_time.py [--models resnet50 repvgg_b1 mobileone_s0] [--depths 100 250 500 1000]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch

import fxreparam
from fxreparam.demo import DiracNet
from fxreparam.testing import calibrate_batch_norms, randomize_batch_norms
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


def real_model(name: str) -> torch.nn.Module:
    """``torchvision:NAME`` for resnets, else timm's model, with random BN statistics."""
    torch.manual_seed(0)
    if name.startswith("resnet"):
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
    return randomize_batch_norms(model).eval()


def against_export(name: str, repeat: int) -> dict[str, float]:
    """Median seconds of ``torch.export`` alone and of ``optimize`` (verification on) over ``repeat`` runs each,
    alternating; the parts of the last optimize call from its report."""
    model, x = real_model(name), torch.randn(1, 3, 224, 224)
    exports, optimizes = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        torch.export.export(model, (x,), strict=False)
        exports.append(time.perf_counter() - start)
        start = time.perf_counter()
        folded = fxreparam.optimize(model, x)
        optimizes.append(time.perf_counter() - start)
    rep = fxreparam.report(folded)
    return {"export": statistics.median(exports), "optimize": statistics.median(optimizes),
            "capture": rep.capture_seconds, "passes": sum(p.seconds for p in rep.passes),
            "verify": rep.verify_seconds, "check": str(rep.verification).split(":")[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["resnet50", "repvgg_b1", "mobileone_s0"],
                        help="real models timed against torch.export at 224x224, one thread (none: skip)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of export and optimize per real model")
    parser.add_argument("--depths", type=int, nargs="*", default=[100, 250, 500, 1000])
    parser.add_argument("--width", type=float, default=0.125, help="group widths are 64, 128, 256, 512 times this")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--capture", nargs="+", default=["symbolic_trace", "export"],
                        choices=["symbolic_trace", "export"], help="capture paths to time")
    args = parser.parse_args()
    print(f"# fxreparam optimize time vs depth - {date.today()} - {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# DiracNet-style plain net, width {args.width}, input 1x3x{args.size}x{args.size}, float32, CPU")
    print("# optimize s = capture + passes + finalize (verify=False); verify s = the check on top")
    if args.models:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        print("# real models, 1x3x224x224, one thread, random BN statistics, median of "
              f"{args.repeat}; optimize = capture + passes + verification (+ finalize)")
        print("| model | torch.export s | optimize s | optimize / export | capture s | passes s | verify s | "
              "verification |")
        print("|---|---|---|---|---|---|---|---|")
        for name in args.models:
            r = against_export(name, args.repeat)
            print(f"| {name} | {r['export']:.2f} | {r['optimize']:.2f} | {r['optimize'] / r['export']:.2f} | "
                  f"{r['capture']:.2f} | {r['passes']:.2f} | {r['verify']:.2f} | {r['check']} |", flush=True)
        torch.set_num_threads(threads)
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
