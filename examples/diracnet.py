"""Fold a DiracNet from its training form into the plain conv chain it is at inference.

DiracNet (Zagoruyko and Komodakis, 2017) trains very deep plain nets by computing each
kernel as ``alpha * dirac + beta * normalize(W)`` and following it with BatchNorm. At
inference both are constants: fxreparam evaluates the kernels once and folds the BNs, and
the result prints like the authors' released deployment model.

    python examples/diracnet.py [--depth 18] [--width 0.75] [--size 224]
"""

from __future__ import annotations

import argparse

import torch
from _report import eager_ms

import fxreparam
from fxreparam.demo import DiracNet
from fxreparam.testing import randomize_batch_norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--width", type=float, default=0.75)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = randomize_batch_norms(DiracNet(depth=args.depth, width=args.width)).eval()
    x = torch.randn(1, 3, args.size, args.size)
    folded = fxreparam.optimize(model, x)

    print(folded)
    print(fxreparam.report(folded))
    print(f"\neager CPU, batch 1, {args.size}x{args.size}: training form {eager_ms(model, x):.1f} ms, "
          f"folded {eager_ms(folded, x):.1f} ms")


if __name__ == "__main__":
    main()
