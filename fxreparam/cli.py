"""The ``fxreparam`` command line: ``fxreparam demo`` folds the built-in DiracNet and prints the report."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from . import list_passes, optimize, report


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1x3x224x224, got {text!r}") from None


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


def _passes(args: argparse.Namespace) -> int:
    width = max(len(p.name) for p in list_passes())
    for p in list_passes():
        print(f"{p.name.ljust(width)}  {p.description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxreparam", description="Fold re-parameterized PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fold the built-in DiracNet (training form) and print the result and report")
    demo.add_argument("--depth", type=int, default=18, help="conv and linear layers (default 18)")
    demo.add_argument("--width", type=float, default=0.75, help="width multiplier (default 0.75)")
    demo.add_argument("--input", type=_shape, default=(1, 3, 224, 224), help="example input shape (1x3x224x224)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="print the report only, not the folded model")
    demo.set_defaults(run=_demo)
    sub.add_parser("passes", help="list the registered passes in the order they run").set_defaults(run=_passes)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fxreparam: %(message)s", stream=sys.stderr)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
