"""Where the backend's run time goes against the hand-written deploy form: Dynamo's per-call work or compiled code.

For each model, two compiles of the same batch-1 input: (e) ``torch.compile(model, backend="fxreparam")`` on the
training structure and (d) timm's ``reparameterize_model`` then Inductor with freezing (``compare.py``'s columns).
Both are compiled through a thin probe backend that keeps the callable the inner compiler returned and the
arguments Dynamo passed it, so the compiled code can be timed alone, without Dynamo's guards and argument
handling. Printed per model: the whole call (d)/(e), the compiled code alone (d)/(e), the number of inputs Dynamo
passes each graph, and the kernels Inductor's output code launches (extern calls such as mkldnn convolutions and
generated C++ kernels), so that equal code shows as equal counts.

    python benchmarks/backend_gap.py [--models mobileone_s0 repvgg_a0 fastvit_t8] [--batch 1] [--repeat 30]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import platform
import re
import sys
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.graph import GraphLowering

from fxreparam.backends import fxreparam_backend
from fxreparam.testing import randomize_batch_norms
from fxreparam.timing import time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import own_frame  # one code object per variant: Dynamo keeps compiled code per code object)

KERNEL_CALL = re.compile(r"^\s+(?:buf\w+ = |)(extern_kernels\.\w+|torch\.ops\.[\w.]+|cpp_fused_\w+?)(?:_\d+)?\(",
                         re.MULTILINE)


class Probe:
    """A Dynamo backend around ``inner`` that records, for the graph it compiled last, the compiled callable and the
    arguments of its latest call (a recompile, e.g. after the freezing config changes, compiles a second graph)."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner, self.compiles = inner, 0
        self.compiled: Callable[..., Any] | None = None
        self.args: tuple[Any, ...] = ()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled = self.inner(gm, example_inputs)
        self.compiles += 1

        def run(*args: Any) -> Any:
            self.compiled, self.args = compiled, args
            return compiled(*args)

        return run


def kernels(code: list[str]) -> collections.Counter[str]:
    """The kernels Inductor's output code launches, by kind (generated C++ kernels counted under one name)."""
    found = collections.Counter()
    for source in code:
        for name in KERNEL_CALL.findall(source):
            found["cpp_fused (generated)" if name.startswith("cpp_fused") else name] += 1
    return found


@contextlib.contextmanager
def output_code() -> Iterator[list[str]]:
    """The output code of every graph Inductor compiles inside the block (``run_and_get_code`` without its reset of
    Dynamo, which would drop the other variant's compiled code)."""
    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        yield codes


def compiled(model: torch.nn.Module, x: torch.Tensor, backend: Callable[..., Any], frozen_trace: bool
             ) -> tuple[Callable[[torch.Tensor], Any], Probe, collections.Counter[str]]:
    """``model`` compiled through a probe of ``backend``, as ``compare.py`` compiles it: with Inductor's ``freezing``
    on while Dynamo traces for the deploy form (Dynamo then keeps its weights on the graph), off for the backend
    (which freezes the weights Dynamo passes it itself)."""
    probe = Probe(backend)
    fn = torch.compile(model, backend=probe)
    with torch.no_grad(), torch._inductor.config.patch(freezing=frozen_trace), output_code() as code:
        fn(x)
    return fn, probe, kernels(code)


def measure(name: str, batch: int, repeat: int) -> dict[str, Any]:
    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(batch, 3, 224, 224)
    deploy = reparameterize_model(copy.deepcopy(model)).eval()
    e, e_probe, e_kernels = compiled(own_frame(model, "e"), x, fxreparam_backend, frozen_trace=False)
    d, d_probe, d_kernels = compiled(own_frame(deploy, "d"), x, compile_fx, frozen_trace=True)
    e_code, d_code = (lambda _: e_probe.compiled(*e_probe.args)), (lambda _: d_probe.compiled(*d_probe.args))
    times = time_interleaved({"e": e, "d": d, "e code": e_code, "d code": d_code}, x, repeat)
    assert (e_probe.compiles, d_probe.compiles) == (1, 1), f"a recompile: {e_probe.compiles}, {d_probe.compiles}"
    return {"model": name, "times": times, "inputs": (len(e_probe.args), len(d_probe.args)),
            "kernels": (e_kernels, d_kernels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobileone_s0", "repvgg_a0", "fastvit_t8"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {date.today()}, {platform.machine()} CPU, 1 thread, torch {torch.__version__}, "
          f"{args.batch}x3x224x224, median of {args.repeat} interleaved runs\n")
    print("| model | (e) backend ms | (d) deploy + Inductor ms | (d)/(e) | (e) compiled code ms | (d) compiled code ms "
          "| (d)/(e) code | graph inputs (e) / (d) | kernels (e) | kernels (d) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name in args.models:
        r = measure(name, args.batch, args.repeat)
        t, (ke, kd) = r["times"], r["kernels"]
        same = "same as (e)" if ke == kd else ", ".join(f"{k} {v}" for k, v in sorted(kd.items()))
        print(f"| {name} | {t['e']:.2f} | {t['d']:.2f} | {t['d'] / t['e']:.3f} | {t['e code']:.2f} | "
              f"{t['d code']:.2f} | {t['d code'] / t['e code']:.3f} | {r['inputs'][0]} / {r['inputs'][1]} | "
              f"{', '.join(f'{k} {v}' for k, v in sorted(ke.items()))} | {same} |", flush=True)


if __name__ == "__main__":
    main()
