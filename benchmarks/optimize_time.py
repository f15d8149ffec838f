"""What ``fxreparam.optimize`` costs: its parts beside ``torch.export`` and one forward, on real models and by depth.

First, for resnet50, timm repvgg_b1, mobileone_s0 (1x3x224x224) and a small net whose forward builds masks by
writing into views (1x1x64x64), one thread, in one process: ``torch.export`` alone, one forward, and the parts
of ``optimize`` from its report: capture, each pass, finalize (and the rest of the call: copying the model),
verification. The fold is the whole call less its verification; its target is at most 2x export, and
verification's at most 8 forwards. Each number is the minimum over ``--repeat`` alternating runs (the machine may
be shared). Then one row per capture path and depth of a DiracNet-style plain net: capture seconds,
pass-pipeline seconds, the whole optimize call, and the verification on top; all must grow linearly with depth.

    python benchmarks/optimize_time.py [--models resnet50 repvgg_b1 mobileone_s0 view_masks] [--depths 100 250]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch
import torch.nn.functional as F
from torch import nn

import fxreparam
from fxreparam.demo import DiracNet
from fxreparam.testing import calibrate_batch_norms, randomize_batch_norms
from fxreparam.verify import verify


class MaskedEdgeBlock(nn.Module):
    """A 1x1 conv, then a depthwise 3x3 whose kernel the forward builds as a fixed edge mask (zeros, then in-place
    writes into views of it: ``mask[:, 0, 1, 0] = 2``) times a learned scale; plus a 3x3 conv and the identity.
    The shape of ECBSR's Sobel/Laplacian branches, where the masks are made in forward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.expand = nn.Conv2d(channels, channels, 1)
        self.scale = nn.Parameter(torch.randn(channels, 1, 1, 1))
        self.bias = nn.Parameter(torch.randn(channels))
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(self.channels, 1, 3, 3, dtype=x.dtype)
        mask[:, 0, 0, 1] = 1.0
        mask[:, 0, 1, 0] = 2.0
        mask[:, 0, 1, 2] = -2.0
        mask[:, 0, 2, 1].fill_(-1.0)
        mask[:, :, 1:2, 1:2] += 0.5
        edges = F.conv2d(F.pad(self.expand(x), (1, 1, 1, 1), value=0.0), self.scale * mask, self.bias,
                         groups=self.channels)
        return self.conv(x) + edges + x


class ViewMasks(nn.Module):
    """A small super-resolution-style net of :class:`MaskedEdgeBlock` s: the model with writes into views."""

    def __init__(self, channels: int = 16, blocks: int = 8) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, channels, 3, padding=1)
        self.body = nn.Sequential(*[MaskedEdgeBlock(channels) for _ in range(blocks)])
        self.tail = nn.Conv2d(channels, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.tail(torch.relu(self.body(self.head(x)))), 2)


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


def real_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """``torchvision:NAME`` for resnets, :class:`ViewMasks` for ``view_masks``, else timm's model; random BN
    statistics; with its example input."""
    torch.manual_seed(0)
    if name == "view_masks":
        return ViewMasks().eval(), torch.randn(1, 1, 64, 64)
    if name.startswith("resnet"):
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
    return randomize_batch_norms(model).eval(), torch.randn(1, 3, 224, 224)


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def split(name: str, repeat: int) -> dict[str, object]:
    """Minimum seconds over ``repeat`` alternating runs of ``torch.export``, one forward and ``optimize`` (verification
    on), and the minimum of each part of optimize from its reports."""
    model, x = real_model(name)
    with torch.no_grad():
        model(x)  # warm: first-call allocations are no part of any of the three
    runs: dict[str, list[float]] = {}
    for _ in range(repeat):
        runs.setdefault("export", []).append(_timed(lambda: torch.export.export(model, (x,), strict=False))[0])
        with torch.no_grad():
            runs.setdefault("forward", []).append(min(_timed(lambda: model(x))[0] for _ in range(3)))
        seconds, folded = _timed(lambda: fxreparam.optimize(model, x))
        rep = fxreparam.report(folded)
        passes = sum(p.seconds for p in rep.passes)
        for key, value in {"optimize": seconds, "fold": seconds - rep.verify_seconds, "capture": rep.capture_seconds,
                           "passes": passes, "finalize": rep.optimize_seconds - rep.verify_seconds - passes,
                           "verify": rep.verify_seconds, **{f"pass {p.name}": p.seconds for p in rep.passes}}.items():
            runs.setdefault(key, []).append(value)
    best: dict[str, object] = {k: min(v) for k, v in runs.items()}
    best["check"] = str(rep.verification).split(":")[0]
    best["ops"] = rep.after.as_dict()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["resnet50", "repvgg_b1", "mobileone_s0", "view_masks"],
                        help="models split against torch.export, one thread (none: skip)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of export, forward and optimize")
    parser.add_argument("--depths", type=int, nargs="*", default=[100, 250, 500, 1000])
    parser.add_argument("--width", type=float, default=0.125, help="group widths are 64, 128, 256, 512 times this")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--capture", nargs="+", default=["symbolic_trace", "export"],
                        choices=["symbolic_trace", "export"], help="capture paths to time")
    args = parser.parse_args()
    print(f"# fxreparam optimize time - {date.today()} - {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, CPU")
    if args.models:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        print(f"# one thread; min of {args.repeat} alternating runs; fold = optimize less its verification; "
              "finalize = the rest of the call past capture and passes (finalize, copying the model)")
        print("| model | torch.export s | forward s | capture s | passes s | finalize s | fold s | fold / export | "
              "verify s | verify / forward | capture / export | verification |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        per_pass = []
        for name in args.models:
            r = split(name, args.repeat)
            print(f"| {name} | {r['export']:.2f} | {r['forward']:.3f} | {r['capture']:.2f} | {r['passes']:.2f} | "
                  f"{r['finalize']:.2f} | {r['fold']:.2f} | {r['fold'] / r['export']:.2f} | {r['verify']:.2f} | "
                  f"{r['verify'] / r['forward']:.1f} | {r['capture'] / r['export']:.2f} | {r['check']} |",
                  flush=True)
            slow = sorted(((k[5:], v) for k, v in r.items() if k.startswith("pass ")), key=lambda kv: -kv[1])
            ops = r["ops"]
            per_pass.append(f"| {name} | " + ", ".join(f"{k} {v:.2f}" for k, v in slow[:4] if v >= 0.005)
                            + f" | {ops['conv']} convs, {ops['batch_norm']} BNs, {ops['parameters']} parameters |")
        print("\n| model | slowest passes (s) | result |")
        print("|---|---|---|")
        print("\n".join(per_pass))
        torch.set_num_threads(threads)
    if not args.depths:
        return
    print(f"\n# DiracNet-style plain net, width {args.width}, input 1x3x{args.size}x{args.size}, float32, "
          f"{torch.get_num_threads()} threads")
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
