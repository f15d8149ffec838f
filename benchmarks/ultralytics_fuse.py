"""fxreparam against ultralytics' own ``model.fuse()`` on its detectors, built offline from their yaml configs (random
weights, no network): conv / BN / add / mul executed per call, stored elements, MACs and relative error of the
training form, of ``fxreparam.optimize`` and of ``fuse()``.

All three are compared on the detections, the first output of an eval-mode call (what ultralytics' export returns):
the rest is the raw head outputs, and ``fuse()`` drops the head the detections do not read (YOLOv10's one-to-one
head, or its one-to-many head end-to-end), so the full outputs of ``fuse()`` have another structure (an error of
"inf") and fxreparam, which must keep every output it is given, would keep that head. ``yolov10n-e2e`` is YOLOv10n
with ``end2end = True`` (one-to-one head, top-k instead of NMS). fxreparam folds each model before its first forward.

    python benchmarks/ultralytics_fuse.py [--models yolov8n yolov9t yolov10n yolov10n-e2e rtdetr-l] [--size 256]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxreparam
from fxreparam.testing import executed_ops, randomize_batch_norms, stored_elements
from fxreparam.verify import relative_error

MODELS = ("yolov8n", "yolov9t", "yolov10n", "yolov10n-e2e", "rtdetr-l")
E2E = "-e2e"


def build(name: str) -> nn.Module:
    """The detector ``name`` from ultralytics' yaml (``-e2e``: end-to-end), in eval mode with random BN statistics."""
    from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel

    torch.manual_seed(0)
    cls = RTDETRDetectionModel if name.startswith("rtdetr") else DetectionModel
    model = randomize_batch_norms(cls(f"{name.removesuffix(E2E)}.yaml", verbose=False)).eval()
    if name.endswith(E2E):
        model.end2end = True
    return model


class Detections(nn.Module):
    """A detector's detections alone: the first output of its eval-mode ``(detections, raw outputs)`` tuple."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


class _CountMuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def measure(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Executed conv / BN / add / mul ops, MACs and stored elements of one call (after a warm-up call, so a model
    that caches its anchors is measured with them cached)."""
    with torch.no_grad():
        model(x)
        with _CountMuls() as mode:
            model(x)
    ops = executed_ops(model, x)
    return {"conv": ops["conv"], "bn": ops["batch_norm"], "add": ops["add"], "mul": mode.counts["mul"],
            "stored": stored_elements(model), "macs": ops["macs"]}


def row(name: str, size: int) -> list[tuple[str, dict[str, float]]]:
    """The three forms of one detector, measured on its detections."""
    built = build(name)
    model = Detections(built).eval()
    x = torch.randn(1, 3, size, size)
    start = time.perf_counter()
    folded = fxreparam.optimize(model, x)  # before the model's first forward, as a user who builds then folds
    seconds = time.perf_counter() - start
    with torch.no_grad():
        want = model(x)
    fused = Detections(copy.deepcopy(built).fuse(verbose=False)).eval()
    forms = [("training form", model), (f"fxreparam ({seconds:.0f} s)", folded), ("fuse()", fused)]
    out = []
    for label, mod in forms:
        with torch.no_grad():
            error = relative_error(want, mod(x))
        out.append((label, {**measure(mod, x), "error": error}))
    return out


def table(results: dict[str, list[tuple[str, dict[str, float]]]], size: int) -> str:
    """A markdown table: one line per model and form."""
    lines = [f"ultralytics detectors from yaml at 1x3x{size}x{size}, torch {torch.__version__}, CPU, "
             f"{time.strftime('%Y-%m-%d')}; compared on the detections (see benchmarks/ultralytics_fuse.py). "
             "End-to-end and RT-DETR detections are a top-k over near-tied scores of random weights: an error "
             "above 1e-5 there is rows swapped by rounding (fuse()'s too), not a wrong value.", "",
             "| model | form | conv | BN | add | mul | stored elements | MACs | rel. error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, forms in results.items():
        for label, m in forms:
            lines.append(f"| {name} | {label} | {m['conv']} | {m['bn']} | {m['add']} | {m['mul']} | "
                         f"{m['stored']:,} | {m['macs']:,} | {m['error']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    results = {name: row(name, args.size) for name in args.models}
    text = table(results, args.size)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
