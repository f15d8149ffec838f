"""The headline benchmark: what users do today against fxreparam, as ratios measured in one run.

For each model, batch size and dtype, the median forward time of
  (a) eager, training structure
  (b) Inductor with freezing on the training structure (what users do today)
  (c) fxreparam.optimize, then Inductor with freezing
  (d) timm's hand-written reparameterize_model, then Inductor with freezing (timm models only)
and the ratios (b)/(c) and (d)/(c). Writes a markdown table and a PNG bar chart.

    python benchmarks/compare.py --device cpu  [--quick]      # small inputs, fp32
    python benchmarks/compare.py --device cuda                 # 224x224, fp32 and fp16, channels_last
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from datetime import date
from pathlib import Path

import torch
from torch import nn

import fxreparam
from fxreparam.demo import DiracNet
from fxreparam.testing import randomize_batch_norms
from fxreparam.timing import time_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


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


def inductor(model: nn.Module) -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend="inductor", options={"freezing": True})


def measure(name: str, batch: int, dtype: torch.dtype, device: str, size: int | None, repeat: int) -> dict:
    torch.manual_seed(0)
    model, natural, has_timm = build(name)
    model = randomize_batch_norms(model).eval().to(device=device, dtype=dtype)
    size = size or natural
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    if device == "cuda":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    folded = fxreparam.optimize(model, x)
    row = {"model": name, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "size": size}
    row["a"] = time_ms(model, x, repeat)
    row["b"] = time_ms(inductor(model), x, repeat)
    row["c"] = time_ms(inductor(folded), x, repeat)
    if has_timm:
        from timm.utils.model import reparameterize_model

        row["d"] = time_ms(inductor(reparameterize_model(copy.deepcopy(model))), x, repeat)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | input | dtype | (a) eager ms | (b) Inductor ms | (c) fxreparam+Inductor ms | "
             "(d) timm+Inductor ms | (b)/(c) | (d)/(c) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = f"{r['d']:.2f}" if "d" in r else "-"
        dc = f"{r['d'] / r['c']:.2f}" if "d" in r else "-"
        lines.append(f"| {r['model']} | {r['batch']}x3x{r['size']}x{r['size']} | {r['dtype']} | {r['a']:.2f} | "
                     f"{r['b']:.2f} | {r['c']:.2f} | {d} | {r['b'] / r['c']:.2f} | {dc} |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\nb{r['batch']} {r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    width = 0.27
    for i, (key, text) in enumerate([("b", "Inductor, training structure"), ("c", "fxreparam + Inductor"),
                                     ("d", "timm reparameterize + Inductor")]):
        values = [r[key] / r["c"] if key in r else 0 for r in rows]
        ax.bar([j + (i - 1) * width for j in range(len(rows))], values, width, label=text)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("time relative to fxreparam + Inductor")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+",
                        default=["repvgg_b1", "mobileone_s0", "fastvit_t8", "acnet", "dbb", "diracnet"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: fp32 on cpu, fp32 and fp16 on cuda")
    parser.add_argument("--size", type=int, default=None, help="input size (default: 64 on cpu, natural on cuda)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="one small model, batch 1: checks the script runs")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the table and the chart")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.repeat = ["acnet"], [1], 3
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    names = args.dtypes or (["fp32"] if args.device == "cpu" else ["fp32", "fp16"])
    size = args.size if args.size is not None else (64 if args.device == "cpu" else None)
    where = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    title = (f"{date.today()}, {args.device} ({where}, {torch.get_num_threads()} threads), torch {torch.__version__}"
             f", median of {args.repeat}")
    rows = []
    for name in args.models:
        for batch in args.batches:
            for dt in names:
                row = measure(name, batch, dtypes[dt], args.device, size if name not in ("acnet",) else None,
                              args.repeat)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
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
