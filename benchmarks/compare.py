"""The headline benchmark: what users do today against fxreparam, run time and compile time, measured in one run.

For each model, batch size, dtype and thread count, the median forward time (the variants take turns, run by run)
of
  (a) eager, training structure
  (b) Inductor with freezing on the training structure (what users can do today without fxreparam)
  (c) fxreparam.optimize(model, x, backend="inductor"): fold, verify, Inductor with freezing
  (e) torch.compile(model, backend="fxreparam"): Dynamo, fold, verify, Inductor with freezing
  (g) as (e), with the module frozen for Dynamo too: its guards on module attributes skipped
      (``options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}``) and Inductor's
      ``freezing`` on while Dynamo traces (it then keeps the weights on the graph instead of passing them on
      every call); the backend freezes the weights anyway
  (d) timm's hand-written reparameterize_model, then Inductor with freezing (timm models only)
and the ratios (b)/(c), (d)/(c), (d)/(e) and (d)/(g) (above 1: fxreparam is faster). Writes a markdown table and a
chart.

"Inductor with freezing" is freezing done as Inductor needs it: ``freezing`` on (and autograd off) while Dynamo
traces (b, d), else Dynamo passes the weights as inputs and Inductor's freezing passes never see them;
fxreparam's own compiles (c, e, g) freeze the weights themselves. Each variant is compiled once, behind a
``forward`` of its own (Dynamo's compiled code is kept per code object; code resumed after a graph break
inside the model would still be shared, which none of the default models has).

Compile time (from the model to the first result: capture, folding, verification and compilation) is measured
for each variant in a process of its own, at the first batch size and thread count given: *cold* with an empty
Inductor cache (a first compile), then *warm* in a second process over the cache the first left (Inductor's
compiled kernels reused). In one process, a variant compiled after another reuses the kernels the other compiled:
the folded graph and the hand-written deploy form share most of theirs.

    python benchmarks/compare.py --device cpu                  # 224x224, batch 1 and 16, 1 thread and all, fp32
    python benchmarks/compare.py --device cpu --quick          # one small model: checks the script runs
    python benchmarks/compare.py --device cuda                 # fp32 and fp16, channels_last
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
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
            "g": "fxreparam backend, module frozen for Dynamo", "d": "timm reparameterize + Inductor"}


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


def own_frame(module: nn.Module, variant: str) -> nn.Module:
    """``module`` behind a ``forward`` with a code object of its own. Dynamo keeps compiled code per code object:
    variants compiled from one model class in one process would otherwise share cache entries (a second
    ``torch.compile(model, backend="fxreparam")`` with other options reuses the first one's code) or walk past
    each other's guards on every call."""

    class Variant(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> object:
            return self.inner(x)

    code = Variant.forward.__code__.replace(co_name=f"forward_{variant}")
    Variant.forward = types.FunctionType(code, Variant.forward.__globals__, code.co_name)
    return Variant(module)


def compiled(variant: str, model: nn.Module, x: torch.Tensor) -> tuple[Callable[[torch.Tensor], object], float]:
    """One variant of ``model``, and the seconds from the model to its first result (capture, folding,
    verification and compilation included). Inductor's ``freezing`` is on while Dynamo traces (b, d, g): only
    then does Dynamo keep the weights on the graph, where Inductor's freezing passes find them;
    ``options={"freezing": True}`` alone compiles them as inputs."""
    start = time.perf_counter()
    frozen_trace = variant in ("b", "d", "g")
    if variant == "a":
        fn = model
    elif variant == "b":
        fn = torch.compile(own_frame(model, variant), backend="inductor", options={"freezing": True})
    elif variant == "c":
        fn = fxreparam.optimize(model, x, backend="inductor")
    elif variant == "e":
        fn = torch.compile(own_frame(model, variant), backend="fxreparam")
    elif variant == "g":
        fn = torch.compile(own_frame(model, variant), backend="fxreparam",
                           options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    else:
        from timm.utils.model import reparameterize_model

        fn = torch.compile(own_frame(reparameterize_model(copy.deepcopy(model)), variant), backend="inductor",
                           options={"freezing": True})
    with torch.no_grad(), torch._inductor.config.patch(freezing=frozen_trace):
        fn(x)
    return fn, time.perf_counter() - start


def setup(name: str, batch: int, dtype: torch.dtype, device: str, size: int | None, threads: int
          ) -> tuple[nn.Module, torch.Tensor, bool]:
    """The model (random BN statistics, eval mode), its input, and whether timm can fold it."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, natural, has_timm = build(name)
    model = randomize_batch_norms(model).eval().to(device=device, dtype=dtype)
    size = size or natural
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    if device == "cuda":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return model, x, has_timm


def variants(has_timm: bool) -> list[str]:
    """The variants this model and this torch run (``g`` needs ``torch.compiler``'s guard filters)."""
    skip_guards = hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe")
    return [v for v in VARIANTS if (v != "d" or has_timm) and (v != "g" or skip_guards)]


def compile_in_process(variant: str, config: str) -> dict[str, float]:
    """``--compile-one``: compile one variant in this (fresh) process, ``config`` being the JSON list that
    :func:`compile_times` passes; its seconds, and the shares of ``optimize`` (c) or of the backend (e, g)."""
    name, batch, dtype, device, size, threads = json.loads(config)
    model, x, _ = setup(name, batch, getattr(torch, dtype), device, size, threads)
    fn, seconds = compiled(variant, model, x)
    result = {"seconds": seconds}
    if variant == "c":
        rep = fxreparam.report(fn)
        result["optimize"] = rep.capture_seconds + rep.optimize_seconds
    if variant in ("e", "g"):  # the backend's share and its inner compile's; Dynamo's trace is the rest
        regions = fxreparam.region_reports()
        result["fold"] = sum(r.capture_seconds + r.optimize_seconds for r in regions)
        result["inner"] = sum(r.compile_seconds for r in regions)
    return result


def compile_times(variant: str, config: list, cache: str) -> tuple[dict[str, float], dict[str, float]]:
    """Cold and warm compile of one variant, each in a process of its own over Inductor cache folder ``cache``
    (empty for the cold one)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
    runs = []
    for _ in ("cold", "warm"):
        out = subprocess.run([sys.executable, __file__, "--compile-one", variant, json.dumps(config)], env=env,
                             capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return runs[0], runs[1]


def measure(name: str, batch: int, dtype: torch.dtype, device: str, size: int | None, threads: int,
            repeat: int, timed_compiles: list[str]) -> dict:
    """One row: the run time of every variant, and the cold and warm compile times of ``timed_compiles``."""
    model, x, has_timm = setup(name, batch, dtype, device, size, threads)
    row: dict = {"model": name, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "size": x.shape[-1],
                 "threads": threads, "cold": {}, "warm": {}}
    fns = {}
    for variant in variants(has_timm):
        if variant in timed_compiles:
            config = [name, batch, row["dtype"], device, size, threads]
            with tempfile.TemporaryDirectory(prefix="fxreparam-compare-") as cache:
                cold, warm = compile_times(variant, config, cache)
            row["cold"][variant], row["warm"][variant] = cold["seconds"], warm["seconds"]
            for key in ("optimize", "fold", "inner"):
                if key in cold:
                    row[f"{key}_{variant}_cold"], row[f"{key}_{variant}_warm"] = cold[key], warm[key]
            print(f"  {name} ({variant}) {VARIANTS[variant]}: compile {cold['seconds']:.1f} s cold, "
                  f"{warm['seconds']:.1f} s warm", file=sys.stderr, flush=True)
        fns[variant], _ = compiled(variant, model, x)
    # Each variant keeps its own compiled code (own_frame), so they can take turns.
    row.update(time_interleaved(fns, x, repeat))
    return row


RATIOS = ("bc", "dc", "de", "dg")


def table(rows: list[dict]) -> str:
    """The run-time table: median ms per variant and the ratios (above 1: fxreparam is faster)."""
    head = " | ".join(f"({v}) {text} ms" for v, text in VARIANTS.items())
    ratios = " | ".join(f"({a})/({b})" for a, b in RATIOS)
    lines = [f"| model | input | dtype | threads | {head} | {ratios} |",
             "|---" * (4 + len(VARIANTS) + len(RATIOS)) + "|"]
    for r in rows:
        cells = [f"{r[v]:.2f}" if v in r else "-" for v in VARIANTS]
        cells += [f"{r[a] / r[b]:.3f}" if a in r and b in r else "-" for a, b in RATIOS]
        lines.append(f"| {r['model']} | {r['batch']}x3x{r['size']}x{r['size']} | {r['dtype']} | {r['threads']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_table(rows: list[dict]) -> str:
    """The compile-time table (cold / warm seconds per variant) and the bounds: (c) within its own optimize time
    plus 1.5x (d), (e) and (g) within 2x (d)."""
    rows = [r for r in rows if r["cold"]]
    if not rows:
        return ""
    head = " | ".join(f"({v}) s" for v in VARIANTS)
    lines = [f"| model | input | threads | cache | {head} | optimize in (c) s | (e) s: Dynamo / fold, verify / "
             "Inductor | (c) <= optimize + 1.5 (d) | (e) <= 2 (d) | (g) <= 2 (d) |",
             "|---" * (4 + len(VARIANTS) + 5) + "|"]
    for r in rows:
        for cache in ("cold", "warm"):
            t = r[cache]
            cells = [f"{t[v]:.1f}" if v in t else "-" for v in VARIANTS]
            opt = r.get(f"optimize_c_{cache}")
            fold, inner = r.get(f"fold_e_{cache}"), r.get(f"inner_e_{cache}")
            split = (f"{t['e'] - fold - inner:.1f} / {fold:.1f} / {inner:.1f}" if "e" in t and fold is not None
                     and inner is not None else "-")
            bounds = ["-", "-", "-"]
            if "d" in t:
                if "c" in t and opt is not None:
                    bounds[0] = f"{'yes' if t['c'] <= opt + 1.5 * t['d'] else 'no'} ({t['c']:.1f} vs " \
                                f"{opt + 1.5 * t['d']:.1f})"
                for i, v in ((1, "e"), (2, "g")):
                    if v in t:
                        bounds[i] = f"{'yes' if t[v] <= 2 * t['d'] else 'no'} ({t[v]:.1f} vs {2 * t['d']:.1f})"
            opt_text = f"{opt:.1f}" if opt is not None else "-"
            lines.append(f"| {r['model']} | {r['batch']}x3x{r['size']}x{r['size']} | {r['threads']} | {cache} | "
                         + " | ".join(cells) + f" | {opt_text} | {split} | " + " | ".join(bounds) + " |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\nb{r['batch']} {r['dtype']} t{r['threads']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    shown = [("b", "Inductor, training structure"), ("e", "fxreparam backend"),
             ("g", "fxreparam backend, module guards skipped"), ("d", "timm reparameterize + Inductor")]
    width = 0.8 / len(shown)
    for i, (key, text) in enumerate(shown):
        values = [r[key] / r["c"] if key in r else 0 for r in rows]
        ax.bar([j + (i - (len(shown) - 1) / 2) * width for j in range(len(rows))], values, width, label=text)
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
    parser.add_argument("--no-compile-times", action="store_true",
                        help="skip the cold and warm compile times (two processes per variant and model)")
    parser.add_argument("--compile-one", nargs=2, metavar=("VARIANT", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_one:  # one compile in this fresh process, for compile_times()
        print(json.dumps(compile_in_process(*args.compile_one)))
        return
    cores = torch.get_num_threads()
    threads = args.threads or ([1, cores] if args.device == "cpu" and cores > 1 else [cores])
    timed = [] if args.no_compile_times else list(VARIANTS)
    if args.quick:  # compile times of eager alone: the two-process path runs, in seconds
        args.models, args.batches, args.repeat, threads, timed = ["acnet"], [1], 3, [cores], timed[:1]
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    names = args.dtypes or (["fp32"] if args.device == "cpu" else ["fp32", "fp16"])
    where = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    title = (f"{date.today()}, {args.device} ({where}, {cores} cores), torch {torch.__version__}, median of "
             f"{args.repeat} interleaved runs")
    rows = []
    for name in args.models:
        first = True  # compile times at the first thread count, batch size and dtype
        for t in threads:
            for batch in args.batches:
                for dt in names:
                    rows.append(measure(name, batch, dtypes[dt], args.device, args.size, t, args.repeat,
                                        timed if first else []))
                    first = False
                    print(table([rows[-1]]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_{args.device}{'_quick' if args.quick else ''}"
    text = f"# {title}\n\n## Run time\n\n{table(rows)}\n"
    if compile_table(rows):
        text += ("\n## Compile time\n\nFrom the model to its first result, each variant in a process of its own: "
                 "cold (empty Inductor cache), then warm (the cache the cold run left).\n\n"
                 f"{compile_table(rows)}\n")
    (out / f"{stem}.md").write_text(text)
    chart(rows, out / f"{stem}.png", title)
    print(text)
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
