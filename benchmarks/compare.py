"""The headline benchmark: what users do today against fxreparam, run time and compile time, measured in one run.

For each model, batch size, dtype and thread count, the median forward time (the variants take turns, run by run)
and the compile time (from the model to the first result) of
  (a) eager, training structure
  (b) Inductor with freezing on the training structure (what users do today)
  (c) fxreparam.optimize(model, x, backend="inductor"): fold, verify, Inductor with freezing
  (e) torch.compile(model, backend="fxreparam"): Dynamo, fold, verify, Inductor with freezing
  (d) timm's hand-written reparameterize_model, then Inductor with freezing (timm models only)
and the ratios (b)/(c), (d)/(c) and (d)/(e) (above 1: fxreparam is faster). Writes a markdown table and a chart.

    python benchmarks/compare.py --device cpu                  # 224x224, batch 1 and 16, 1 thread and all, fp32
    python benchmarks/compare.py --device cpu --quick          # one small model: checks the script runs
    python benchmarks/compare.py --device cuda                 # fp32 and fp16, channels_last
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from torch import nn

import fxreparam
from fxreparam.demo import DiracNet
from fxreparam.testing import randomize_batch_norms
from fxreparam.timing import time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

VARIANTS = {"a": "eager", "b": "Inductor", "c": "fxreparam.optimize + Inductor", "e": "fxreparam backend",
            "d": "timm reparameterize + Inductor"}


def build(name: str) -> tuple[nn.Module, int, bool]:
    """The model in its training structure (eval mode), its natural input size, and whether timm can fold it."""
    if name == "acnet":
        from acnet import acnet_vgg

        return acnet_vgg(), 32, False
    if name == "dbb":
        from dbb import dbb_net

        return dbb_net(), 56, False
    if name == "diracnet":
        return DiracNet(18, 0.75), 224, False
    import timm

    return timm.create_model(name, pretrained=False), 224, True


def compiled(variant: str, model: nn.Module, x: torch.Tensor) -> tuple[Callable[[torch.Tensor], object], float]:
    """One variant of ``model``, and the seconds from the model to its first result (capture, folding,
    verification and compilation included)."""
    torch._dynamo.reset()
    start = time.perf_counter()
    if variant == "a":
        fn = model
    elif variant == "b":
        fn = torch.compile(model, backend="inductor", options={"freezing": True})
    elif variant == "c":
        fn = fxreparam.optimize(model, x, backend="inductor")
    elif variant == "e":
        fn = torch.compile(model, backend="fxreparam")
    else:
        from timm.utils.model import reparameterize_model

        fn = torch.compile(reparameterize_model(copy.deepcopy(model)), backend="inductor", options={"freezing": True})
    with torch.no_grad():
        fn(x)
    return fn, time.perf_counter() - start


def measure(name: str, batch: int, dtype: torch.dtype, device: str, size: int | None, threads: int,
            repeat: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, natural, has_timm = build(name)
    model = randomize_batch_norms(model).eval().to(device=device, dtype=dtype)
    size = size or natural
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    if device == "cuda":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    row: dict = {"model": name, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "size": size,
                 "threads": threads, "compile": {}}
    fns = {}
    for variant in [v for v in VARIANTS if v != "d" or has_timm]:
        fns[variant], row["compile"][variant] = compiled(variant, model, x)
    # Each variant keeps its own compiled code (Dynamo's cache is per function object), so they can take turns.
    row.update(time_interleaved(fns, x, repeat))
    return row


def table(rows: list[dict]) -> str:
    head = " | ".join(f"({v}) {text} ms" for v, text in VARIANTS.items())
    lines = [f"| model | input | dtype | threads | {head} | (b)/(c) | (d)/(c) | (d)/(e) | compile s: "
             + " / ".join(f"({v})" for v in VARIANTS) + " |", "|---" * (4 + len(VARIANTS) + 3 + 1) + "|"]
    for r in rows:
        cells = [f"{r[v]:.2f}" if v in r else "-" for v in VARIANTS]
        ratio = {pair: f"{r[pair[0]] / r[pair[1]]:.3f}" if pair[0] in r and pair[1] in r else "-"
                 for pair in ("bc", "dc", "de")}
        compile_s = " / ".join(f"{r['compile'][v]:.1f}" if v in r["compile"] else "-" for v in VARIANTS)
        lines.append(f"| {r['model']} | {r['batch']}x3x{r['size']}x{r['size']} | {r['dtype']} | {r['threads']} | "
                     + " | ".join(cells) + f" | {ratio['bc']} | {ratio['dc']} | {ratio['de']} | {compile_s} |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\nb{r['batch']} {r['dtype']} t{r['threads']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    shown = [("b", "Inductor, training structure"), ("e", "fxreparam backend"),
             ("d", "timm reparameterize + Inductor")]
    width = 0.8 / len(shown)
    for i, (key, text) in enumerate(shown):
        values = [r[key] / r["c"] if key in r else 0 for r in rows]
        ax.bar([j + (i - 1) * width for j in range(len(rows))], values, width, label=text)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("time relative to fxreparam.optimize + Inductor")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["mobileone_s0", "repvgg_a0", "fastvit_t8"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts (default on cpu: 1 and all cores)")
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: fp32 on cpu, fp32 and fp16 on cuda")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the model's natural size)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="one small model, batch 1: checks the script runs")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the table and the chart")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    threads = args.threads or ([1, cores] if args.device == "cpu" and cores > 1 else [cores])
    if args.quick:
        args.models, args.batches, args.repeat, threads = ["acnet"], [1], 3, [cores]
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    names = args.dtypes or (["fp32"] if args.device == "cpu" else ["fp32", "fp16"])
    where = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    title = (f"{date.today()}, {args.device} ({where}, {cores} cores), torch {torch.__version__}, median of "
             f"{args.repeat} interleaved runs")
    rows = []
    for name in args.models:
        for t in threads:
            for batch in args.batches:
                for dt in names:
                    rows.append(measure(name, batch, dtypes[dt], args.device, args.size, t, args.repeat))
                    print(table([rows[-1]]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_{args.device}{'_quick' if args.quick else ''}"
    text = f"# {title}\n\n{table(rows)}\n"
    (out / f"{stem}.md").write_text(text)
    chart(rows, out / f"{stem}.png", title)
    print(text)
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
