"""The ``fxreparam`` command line.

    fxreparam demo                                   fold the built-in DiracNet and print the report
    fxreparam optimize MODEL --input 1x3x224x224     fold a model, print the report, optionally save it
    fxreparam bench MODEL --input 1x3x224x224        time the original against the folded model
    fxreparam passes                                 list the registered passes

MODEL is ``timm:NAME``, ``torchvision:NAME`` or ``path/to/file.py:factory`` (a function returning the
model). ``--weights`` loads a state dict with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import deploy, list_passes, optimize, report
from .timing import time_ms

log = logging.getLogger("fxreparam")


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1x3x224x224, got {text!r}") from None


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """The model named by ``timm:NAME``, ``torchvision:NAME`` or ``file.py:factory``, in eval mode."""
    kind, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"fxreparam: MODEL must be timm:NAME, torchvision:NAME or file.py:factory, not {spec!r}")
    log.info("loading %s ...", spec)
    if kind == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    elif kind == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
    else:
        path = Path(kind)
        if not path.is_file():
            raise SystemExit(f"fxreparam: no such file {kind!r} (MODEL is timm:NAME, torchvision:NAME or file.py:fn)")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        factory = getattr(module, name, None)
        if not callable(factory):
            raise SystemExit(f"fxreparam: {kind} has no function {name!r}")
        model = factory()
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def _demo(args: argparse.Namespace) -> int:
    from .demo import DiracNet
    from .testing import randomize_batch_norms

    torch.manual_seed(args.seed)
    model = randomize_batch_norms(DiracNet(depth=args.depth, width=args.width), seed=args.seed).eval()
    folded = optimize(model, torch.randn(*args.input))
    if not args.quiet:
        print(folded)
    print(report(folded))
    return 0


def _optimize(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.weights)
    x = torch.randn(*args.input)
    backend = None if args.backend == "eager" else args.backend
    options: dict[str, Any] = {}
    if args.backend == "aot_inductor" and args.out:
        options["path"] = args.out  # without --out, deploy writes into a fresh temporary directory
    if args.backend == "tensorrt":
        options.update(precision=args.precision, path=args.out)
    result = optimize(model, x, skip=args.skip, capture=args.capture, backend=backend, backend_options=options)
    folded = result[0] if isinstance(result, tuple) else result
    print(report(folded) if hasattr(folded, "fxreparam_report") else "")
    if args.backend == "aot_inductor":
        print(f"AOTInductor package: {result[1]}")
    elif args.out and args.backend == "eager":
        print(f"saved: {deploy.save(folded, args.out, x)}")
    elif args.out and args.backend == "inductor":
        raise SystemExit("fxreparam: --out with --backend inductor: save the eager result (--backend eager) or "
                         "build an AOTInductor package (--backend aot_inductor)")
    elif args.backend == "tensorrt" and args.out:
        print(f"TensorRT program: {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.weights)
    x = torch.randn(*args.input)
    folded = optimize(model, x, capture=args.capture)
    rows = [("original", "eager", time_ms(model, x, args.repeat)), ("folded", "eager", time_ms(folded, x, args.repeat))]
    if args.backend == "inductor":
        log.info("compiling both with Inductor (freezing) ...")
        for label, m in (("original", model), ("folded", folded)):
            compiled = torch.compile(m, backend="inductor", options={"freezing": True})
            rows.append((label, "inductor", time_ms(compiled, x, args.repeat)))
    base = {backend: ms for label, backend, ms in rows if label == "original"}
    shape = "x".join(map(str, args.input))
    print(f"{args.model}, input {shape}, {x.device}, {torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"{'model':<10}{'backend':<10}{'ms':>10}{'speedup':>10}")
    for label, backend, ms in rows:
        print(f"{label:<10}{backend:<10}{ms:>10.2f}{base[backend] / ms:>9.2f}x")
    return 0


def _passes(args: argparse.Namespace) -> int:
    width = max(len(p.name) for p in list_passes())
    for p in list_passes():
        print(f"{p.name.ljust(width)}  {p.description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxreparam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fold the built-in DiracNet (training form) and print the result and report")
    demo.add_argument("--depth", type=int, default=18, help="conv and linear layers (default 18)")
    demo.add_argument("--width", type=float, default=0.75, help="width multiplier (default 0.75)")
    demo.add_argument("--input", type=_shape, default=(1, 3, 224, 224), help="example input shape (1x3x224x224)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="print the report only, not the folded model")
    demo.set_defaults(run=_demo)
    for name, fn, text in (("optimize", _optimize, "fold a model and print the report"),
                           ("bench", _bench, "time the original against the folded model")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("model", help="timm:NAME, torchvision:NAME or path/to/file.py:factory")
        cmd.add_argument("--input", type=_shape, required=True, help="example input shape, e.g. 1x3x224x224")
        cmd.add_argument("--weights", help="a state dict to load (torch.load with weights_only=True)")
        cmd.add_argument("--capture", default="auto", choices=["auto", "export", "symbolic_trace"])
        cmd.set_defaults(run=fn)
        if name == "optimize":
            cmd.add_argument("--backend", default="eager", choices=["eager", "inductor", "aot_inductor", "tensorrt"])
            cmd.add_argument("--out", help="where to write the result (.pt2 program, AOTInductor package, TensorRT)")
            cmd.add_argument("--skip", nargs="*", default=[], help="passes not to run")
            cmd.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="TensorRT precision")
        else:
            cmd.add_argument("--backend", default="eager", choices=["eager", "inductor"])
            cmd.add_argument("--repeat", type=int, default=20)
    sub.add_parser("passes", help="list the registered passes in the order they run").set_defaults(run=_passes)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fxreparam: %(message)s", stream=sys.stderr)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
