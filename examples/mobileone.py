"""MobileOne (Vasu et al., CVPR 2023), from timm in its training structure: k over-parameterized conv-BN
branches, a 1x1 scale branch and a BN skip per block. fxreparam folds it as far as timm's hand-written
``reparameterize_model`` does, without knowing the block class.

    python examples/mobileone.py [--model mobileone_s0] [--size 224]
"""

from __future__ import annotations

import argparse

import timm
import torch
from _report import summarize

import fxreparam
from fxreparam.testing import randomize_batch_norms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mobileone_s0")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model(args.model, pretrained=False)).eval()
    x = torch.randn(1, 3, args.size, args.size)
    summarize(f"timm {args.model}", model, fxreparam.optimize(model, x), x)


if __name__ == "__main__":
    main()
