"""What every call of a ``torch.compile``d model costs before its compiled code runs: Dynamo's guards and the
gathering of the weights it passes to the graph, measured with a backend that returns a stored output.

For each model, in its training structure and in timm's hand-written deploy form, with torch.compile's defaults,
with ``guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe``, and with that filter plus Inductor's
``freezing`` on while Dynamo traces (the weights then stay on the graph). No backend can change these costs: Dynamo
builds the guards after the backend returns, from torch.compile's own options.

    python benchmarks/dynamo_overhead.py [--models mobileone_s0 fastvit_t8] [--repeat 300]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from datetime import date

import timm
import torch
from timm.utils.model import reparameterize_model
from torch import nn

from fxreparam.testing import randomize_batch_norms

SETTINGS = ("defaults", "guard filter", "guard filter + freezing while tracing")


def per_call_ms(model: nn.Module, x: torch.Tensor, setting: str, repeat: int) -> tuple[float, int]:
    """Median milliseconds of a call that runs no compiled code, and how many inputs Dynamo passes the graph."""
    with torch.no_grad():
        stored = model(x)
    inputs: list[int] = []

    def stored_output(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        inputs.append(len(example_inputs))
        return lambda *args: (stored,)

    options = None if setting == "defaults" else {
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    fn = torch.compile(model, backend=stored_output, options=options)
    with torch.no_grad(), torch._inductor.config.patch(freezing="freezing" in setting):
        fn(x)
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            start = time.perf_counter()
            fn(x)
            times.append(1000 * (time.perf_counter() - start))
    torch._dynamo.reset()
    return statistics.median(times[repeat // 5:]), inputs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobileone_s0", "repvgg_a0", "fastvit_t8"])
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {date.today()}, CPU, one thread, torch {torch.__version__}, timm {timm.__version__}, 1x3x224x224, "
          f"median of {args.repeat} calls; ms per call / inputs Dynamo passes the graph")
    print(f"| model | form | {' | '.join(SETTINGS)} |")
    print(f"|---|---|{'---|' * len(SETTINGS)}")
    for name in args.models:
        torch.manual_seed(0)
        model = randomize_batch_norms(timm.create_model(name)).eval()
        x = torch.randn(1, 3, 224, 224)
        for form, m in (("training", model), ("hand-folded", reparameterize_model(copy.deepcopy(model)))):
            cells = [per_call_ms(m, x, setting, args.repeat) for setting in SETTINGS]
            print(f"| {name} | {form} | {' | '.join(f'{ms:.3f} / {n}' for ms, n in cells)} |", flush=True)


if __name__ == "__main__":
    main()
