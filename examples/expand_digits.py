"""fxreparam.expand on real data: a small CNN trained on scikit-learn's handwritten digits (8x8 images, 10
classes, bundled with scikit-learn: no download), once as it is and once expanded into a training-time
structure (DBB by default), which is then folded back into the plain architecture.

Both runs start from the same initial weights (the expanded model computes exactly the plain model's function
at initialization) and see the same batches in the same order.

    python examples/expand_digits.py [--style dbb|repvgg|acnet|mobileone|all] [--epochs 15]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fxreparam
from fxreparam.expand import STYLES


def conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


def small_cnn() -> nn.Sequential:
    """8x8 -> 4x4 -> 2x2: a dense, a strided, a depthwise, a pointwise and a grouped strided conv."""
    return nn.Sequential(conv_bn_relu(1, 16, 3), conv_bn_relu(16, 32, 3, 2), conv_bn_relu(32, 32, 3, groups=32),
                         conv_bn_relu(32, 64, 1), conv_bn_relu(64, 64, 3, 2, groups=4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images (N, 1, 8, 8), standardized with the train set's statistics, and their labels."""
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(data.images, data.target, test_size=0.2, random_state=0,
                                                        stratify=data.target)
    x_train, x_test = (torch.tensor(a, dtype=torch.float32).unsqueeze(1) for a in (x_train, x_test))
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, torch.tensor(y_train), (x_test - mean) / std, torch.tensor(y_test)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 64, seed: int = 0
          ) -> nn.Module:
    """SGD with Nesterov momentum and a one-cycle schedule; every run sees the same batches in the same order."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, pct_start=0.2)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            batch = order[i:i + batch_size]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # one-pixel translations
            inputs = torch.roll(x[batch], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(inputs), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def row(name: str, acc: float, model: nn.Module, ops: fxreparam.OpCounts) -> str:
    params = sum(p.numel() for p in model.parameters())
    return (f"{name:<22}{100 * acc:>8.2f}%{params:>10,}{ops.parameters:>10,}{ops.conv:>6}{ops.batch_norm:>5}"
            f"{ops.add_sub:>5}{ops.macs:>10,}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--style", default="dbb", choices=[*STYLES, "all"])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny convs on 8x8 images: threads cost more than they give
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(0)
    initial = small_cnn()
    example = x_test[:8]

    start = time.perf_counter()
    plain = train(copy.deepcopy(initial), x_train, y_train, args.epochs)
    deployed = fxreparam.optimize(plain, example)
    plain_report = fxreparam.report(deployed)
    lines = [row("plain", accuracy(plain, x_test, y_test), plain, plain_report.before),
             row("plain, deployed", accuracy(deployed, x_test, y_test), deployed, plain_report.after)]
    styles = list(STYLES) if args.style == "all" else [args.style]
    for style in styles:
        torch.manual_seed(1)  # the added branches' initial weights, whichever styles ran before
        expanded = fxreparam.expand(initial, style)
        train(expanded, x_train, y_train, args.epochs)
        folded = fxreparam.optimize(expanded, example)
        rep = fxreparam.report(folded)
        with torch.no_grad():
            gap = ((folded(x_test) - expanded(x_test)).norm() / expanded(x_test).norm()).item()
        lines += [row(f"{style} expanded", accuracy(expanded, x_test, y_test), expanded, rep.before),
                  row(f"{style} folded", accuracy(folded, x_test, y_test), folded, rep.after)
                  + f"   (vs expanded: relative error {gap:.1e}; refused: {len(rep.refusals)})"]
    seconds = time.perf_counter() - start

    print(f"digits: {len(x_train)} train and {len(x_test)} test images, {args.epochs} epochs, "
          f"{torch.get_num_threads()} thread")
    print(f"{'model':<22}{'test acc':>9}{'params':>10}{'stored':>10}{'conv':>6}{'bn':>5}{'add':>5}{'MACs':>10}")
    print(*lines, sep="\n")
    print("params: trainable parameters; stored: parameters and buffers (BN statistics); conv, bn, add: ops in the "
          "captured graph; MACs per image")
    print(f"trained and folded in {seconds:.0f} s")


if __name__ == "__main__":
    main()
