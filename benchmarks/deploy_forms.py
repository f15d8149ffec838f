"""fxreparam against the papers' hand-written deploy forms: for each training-structure family in ``examples/``,
the ops, stored weights, MACs and error of the training structure, of ``fxreparam.optimize`` and of a deploy
model built here block by block with each paper's closed-form kernel-and-bias conversion.

The conversions below are written from the papers (and timm's ``reparameterize()`` methods), with plain tensor
math and none of fxreparam's algebra, so that the hand form is an independent check of what fxreparam should reach.

    python benchmarks/deploy_forms.py [--size 32] [--small] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxreparam
from fxreparam.demo import DiracNet
from fxreparam.testing import executed_ops, randomize_batch_norms, stored_elements
from fxreparam.verify import relative_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from acnet import ACBlock, acnet_vgg
from dbb import DiverseBranchBlock, dbb_net
from repvgg import RepVGG, RepVGGBlock
from resrep import CompactorBlock, resrep_net

FAMILIES = ("RepVGG", "ACNet", "DBB", "ResRep", "MobileOne", "DiracNet")


# ---------------------------------------------------------------------------------------------------------------
# Closed-form pieces shared by the conversions.
# ---------------------------------------------------------------------------------------------------------------

def fuse_bn(kernel: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Kernel and bias of ``bn(conv(x))`` (DBB transform I): scale each output channel by gamma / std."""
    t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    return kernel * t.reshape(-1, 1, 1, 1), (bias - bn.running_mean) * t + bn.bias


def center_pad(kernel: Tensor, k: int) -> Tensor:
    """A 1x1, 1xk or kx1 kernel zero-padded to kxk around its center (DBB transform VI, ACNet's skeleton)."""
    kh, kw = kernel.shape[-2:]
    return F.pad(kernel, [(k - kw) // 2, (k - kw) // 2, (k - kh) // 2, (k - kh) // 2])


def identity_kernel(channels: int, groups: int, k: int) -> Tensor:
    """The kxk (grouped) conv kernel that copies its input: RepVGG's and MobileOne's identity branch."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, k, k)
    for i in range(channels):
        kernel[i, i % per_group, k // 2, k // 2] = 1.0
    return kernel


def compose_1x1_kxk(k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """1x1 conv then kxk conv as one kxk conv (DBB transform III); exact as BNAndPad pads the kxk input with b1."""
    kernel = torch.einsum("ochw,ci->oihw", k2, k1[:, :, 0, 0])
    return kernel, torch.einsum("ochw,c->o", k2, b1) + b2


def make_conv(kernel: Tensor, bias: Tensor, stride: int | tuple[int, ...], padding: int | tuple[int, ...],
              groups: int = 1) -> nn.Conv2d:
    """A biased ``nn.Conv2d`` holding ``kernel`` and ``bias``: the one conv a block deploys as."""
    cout, cin_per_group, kh, kw = kernel.shape
    conv = nn.Conv2d(cin_per_group * groups, cout, (kh, kw), stride, padding, groups=groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
    return conv


def pool_head(linear: nn.Linear) -> list[nn.Module]:
    """Global average pool, flatten and a copy of the classifier: every family's head, unchanged at deploy."""
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), copy.deepcopy(linear)]


# ---------------------------------------------------------------------------------------------------------------
# Hand deploy forms, one per family.
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def repvgg_conv(block: RepVGGBlock) -> nn.Conv2d:
    """RepVGG: BN-fused 3x3 + BN-fused 1x1 padded to 3x3 + identity BN as a Dirac kernel, summed."""
    dense, one = block.rbr_dense[0], block.rbr_1x1[0]
    kernel, bias = fuse_bn(dense.weight, None, block.rbr_dense[1])
    k1, b1 = fuse_bn(one.weight, None, block.rbr_1x1[1])
    kernel, bias = kernel + center_pad(k1, 3), bias + b1
    if block.rbr_identity is not None:
        ki, bi = fuse_bn(identity_kernel(dense.in_channels, 1, 3), None, block.rbr_identity)
        kernel, bias = kernel + ki, bias + bi
    return make_conv(kernel, bias, dense.stride, 1)


def deploy_repvgg(model: RepVGG) -> nn.Sequential:
    """RepVGG deploys as a VGG-style stack: one 3x3 conv and a ReLU per block, then the pooled classifier."""
    layers: list[nn.Module] = []
    for block in model.stages:
        layers += [repvgg_conv(block), nn.ReLU()]
    return nn.Sequential(*layers, *pool_head(model.head))


@torch.no_grad()
def acnet_conv(block: ACBlock) -> nn.Conv2d:
    """ACNet: BN-fused kxk + 1xk + kx1 kernels, the asymmetric ones added into the square's central cross."""
    square = block.square[0]
    k = square.kernel_size[0]
    kernel, bias = fuse_bn(square.weight, None, block.square[1])
    for branch in (block.hor, block.ver):
        # the example pads 1xk by (0, k//2) and kx1 by (k//2, 0): the same window as the square's central row
        # and column, so padding the kernel to kxk about its center is exact (no crop needed)
        kb, bb = fuse_bn(branch[0].weight, None, branch[1])
        kernel, bias = kernel + center_pad(kb, k), bias + bb
    return make_conv(kernel, bias, square.stride, square.padding)


def deploy_acnet(model: nn.Sequential) -> nn.Sequential:
    """ACNet deploys as the same VGG with one kxk conv and ReLU per asymmetric convolution block."""
    layers = [nn.Sequential(acnet_conv(m), nn.ReLU()) if isinstance(m, ACBlock) else copy.deepcopy(m) for m in model]
    return nn.Sequential(*layers)


@torch.no_grad()
def dbb_conv(block: DiverseBranchBlock) -> nn.Conv2d:
    """DBB: the four branches as kxk kernels by transforms I, III, V and VI, summed (II), so the block is one conv."""
    origin = block.dbb_origin[0]
    if origin.groups != 1:
        raise NotImplementedError("the hand DBB conversion covers groups=1, as the example builds it")
    k, cout = origin.kernel_size[0], origin.out_channels
    kernel, bias = fuse_bn(origin.weight, None, block.dbb_origin[1])                   # I
    k1, b1 = fuse_bn(block.dbb_1x1[0].weight, None, block.dbb_1x1[1])                 # I
    kernel, bias = kernel + center_pad(k1, k), bias + b1                                # VI, II
    # 1x1 -> BNAndPad -> avg pool -> BN: the pool is a kxk conv of 1/k^2 per channel (V), composed with the
    # BN-fused 1x1 (III; BNAndPad pads with that 1x1's bias, so the composition is exact), then BN-fused (I)
    ka, ba = fuse_bn(block.dbb_avg[0].weight, None, block.dbb_avg[1].bn)
    avg = torch.eye(cout).reshape(cout, cout, 1, 1).expand(cout, cout, k, k) / k**2
    ka, ba = compose_1x1_kxk(ka, ba, avg, torch.zeros(cout))
    ka, ba = fuse_bn(ka, ba, block.dbb_avg[3])
    kernel, bias = kernel + ka, bias + ba                                               # II
    # 1x1 -> BNAndPad -> kxk -> BN: the BN-fused 1x1 composed into the kxk (III), then BN-fused (I)
    chain = block.dbb_1x1_kxk
    kc, bc = fuse_bn(chain[0].weight, None, chain[1].bn)
    kc, bc = compose_1x1_kxk(kc, bc, chain[2].weight, torch.zeros(cout))
    kc, bc = fuse_bn(kc, bc, chain[3])
    kernel, bias = kernel + kc, bias + bc                                               # II
    return make_conv(kernel, bias, origin.stride, origin.padding)


def deploy_dbb(model: nn.Sequential) -> nn.Sequential:
    """A DBB net deploys as one kxk conv and ReLU per diverse branch block."""
    layers = [nn.Sequential(dbb_conv(m), nn.ReLU()) if isinstance(m, DiverseBranchBlock) else copy.deepcopy(m)
              for m in model]
    return nn.Sequential(*layers)


@torch.no_grad()
def deploy_resrep(model: nn.Sequential) -> nn.Sequential:
    """ResRep: BN-fused conv, compactor merged (Q @ W), zero rows pruned with the next layer's inputs: fewer MACs."""
    layers: list[nn.Module] = []
    keep_in: Tensor | None = None  # the previous block's surviving channels
    for m in model:
        if isinstance(m, CompactorBlock):
            kernel, bias = fuse_bn(m.conv.weight, None, m.bn)
            q = m.compactor.weight[:, :, 0, 0]
            kernel, bias = torch.einsum("oc,cihw->oihw", q, kernel), q @ bias
            keep = q.abs().sum(1) != 0  # rows the compactor zeroed: channels that are zero for every input
            if keep_in is not None:
                kernel = kernel[:, keep_in]
            layers += [make_conv(kernel[keep], bias[keep], m.conv.stride, m.conv.padding), nn.ReLU()]
            keep_in = keep
        elif isinstance(m, nn.Linear):
            linear = copy.deepcopy(m)
            if keep_in is not None:  # a zero channel pools to a zero feature: its column never contributes
                linear = nn.Linear(int(keep_in.sum()), m.out_features)
                linear.weight.copy_(m.weight[:, keep_in])
                linear.bias.copy_(m.bias)
            layers.append(linear)
        else:
            layers.append(copy.deepcopy(m))
    return nn.Sequential(*layers)


@torch.no_grad()
def mobileone_conv(block: nn.Module) -> nn.Conv2d:
    """MobileOne: k BN-fused kxk branches + BN-fused 1x1 padded + identity BN as a grouped Dirac kernel, summed."""
    first = block.conv_kxk[0].conv
    k, groups = first.kernel_size[0], first.groups
    kernel = torch.zeros_like(first.weight)
    bias = torch.zeros(first.out_channels)
    for branch in block.conv_kxk:
        kb, bb = fuse_bn(branch.conv.weight, None, branch.bn)
        kernel, bias = kernel + kb, bias + bb
    if block.conv_scale is not None:
        ks, bs = fuse_bn(block.conv_scale.conv.weight, None, block.conv_scale.bn)
        kernel, bias = kernel + center_pad(ks, k), bias + bs
    if block.identity is not None:
        ki, bi = fuse_bn(identity_kernel(first.in_channels, groups, k), None, block.identity)
        kernel, bias = kernel + ki, bias + bi
    return make_conv(kernel, bias, first.stride, first.padding, groups)


def deploy_mobileone(model: nn.Module) -> nn.Sequential:
    """timm's MobileOne deploys as one conv and ReLU per block (stem and stages, in order), then the classifier."""
    from timm.models.byobnet import MobileOneBlock

    layers: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, MobileOneBlock):
            if not isinstance(m.attn, nn.Identity) or not isinstance(m.act, nn.ReLU):
                raise NotImplementedError("the hand MobileOne form covers blocks without SE, with ReLU")
            layers += [mobileone_conv(m), nn.ReLU()]
    if not isinstance(model.final_conv, nn.Identity):
        raise NotImplementedError("the hand MobileOne form covers nets without a final conv")
    return nn.Sequential(*layers, *pool_head(model.head.fc))


class NCReLU(nn.Module):
    """DiracNet's activation, kept at deploy: ``[relu(x), -relu(-x)]`` along channels."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.relu(x), -F.relu(-x)], dim=1)


@torch.no_grad()
def dirac_conv(block: nn.Module) -> nn.Conv2d:
    """DiracNet: the kernel alpha * dirac + beta * W / ||W|| (per output channel), then its BN fused."""
    conv = block.conv
    w = conv.weight
    cout, cin = w.shape[:2]
    dirac = center_pad(torch.eye(cout, cin).reshape(cout, cin, 1, 1), w.shape[-1])
    normalized = w / w.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
    kernel = conv.alpha.reshape(-1, 1, 1, 1) * dirac + conv.beta.reshape(-1, 1, 1, 1) * normalized
    kernel, bias = fuse_bn(kernel, None, block.bn)
    return make_conv(kernel, bias, conv.stride, conv.padding)


@torch.no_grad()
def deploy_diracnet(model: DiracNet) -> nn.Sequential:
    """DiracNet deploys as its released plain chain: stem conv (BN fused), then NCReLU and one 3x3 conv per block."""
    stem, stem_bias = fuse_bn(model.conv.weight, None, model.bn)
    layers: list[nn.Module] = [make_conv(stem, stem_bias, model.conv.stride, model.conv.padding),
                               copy.deepcopy(model.max_pool0)]
    for stage in model.groups:
        if isinstance(stage, nn.MaxPool2d):
            layers.append(copy.deepcopy(stage))
            continue
        for block in stage:
            layers += [NCReLU(), dirac_conv(block)]
    return nn.Sequential(*layers, nn.ReLU(), *pool_head(model.fc))


# ---------------------------------------------------------------------------------------------------------------
# The training structures, as the examples build them.
# ---------------------------------------------------------------------------------------------------------------

def tiny_mobileone(num_classes: int = 10) -> nn.Module:
    """timm's MobileOne (four conv branches, as mobileone_s0) at a quarter width and one block pair per stage."""
    from timm.models.byobnet import ByobNet, ByoModelCfg, _mobileone_bcfg

    blocks = _mobileone_bcfg(d=(1, 1, 1, 1), wf=(0.25, 0.25, 0.25, 0.25), num_conv_branches=4)
    return ByobNet(ByoModelCfg(blocks=blocks, stem_type="one", stem_chs=16), num_classes=num_classes)


@torch.no_grad()
def zero_compactor_rows(model: nn.Module, fraction: float = 0.25, seed: int = 0) -> nn.Module:
    """Zero a random ``fraction`` of each compactor's rows (in place), as ResRep training leaves them, to prune."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, CompactorBlock):
            rows = m.compactor.out_channels
            m.compactor.weight[torch.randperm(rows, generator=g)[: int(rows * fraction)]] = 0
    return model


def resrep_model(small: bool) -> nn.Module:
    """The example's compactor net, compactors perturbed as trained (as examples/resrep.py does), some rows zero."""
    model = resrep_net((8, 16, 16, 32, 32)) if small else resrep_net()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CompactorBlock):
                m.compactor.weight.add_(0.1 * torch.randn_like(m.compactor.weight))
    return zero_compactor_rows(model)


def mobileone_model(small: bool) -> nn.Module:
    """timm's mobileone_s0 (as examples/mobileone.py builds it), or a tiny one with the same blocks."""
    import timm

    return tiny_mobileone() if small else timm.create_model("mobileone_s0", pretrained=False)


BUILDERS: dict[str, tuple[Callable[[bool], nn.Module], Callable[[nn.Module], nn.Module]]] = {
    "RepVGG": (lambda small: RepVGG((1, 2, 2, 2, 1), (8, 8, 16, 16, 32), 10) if small else RepVGG(),
               deploy_repvgg),
    "ACNet": (lambda small: acnet_vgg((8, 8, 16, 16)) if small else acnet_vgg(), deploy_acnet),
    "DBB": (lambda small: dbb_net((8, 16, 16), 10) if small else dbb_net(), deploy_dbb),
    "ResRep": (resrep_model, deploy_resrep),
    "MobileOne": (mobileone_model, deploy_mobileone),
    "DiracNet": (lambda small: DiracNet(6, 0.125, 10) if small else DiracNet(18, 0.75), deploy_diracnet),
}


def build(family: str, small: bool = False) -> nn.Module:
    """The family's training structure in eval mode with random BN statistics (seeded as the examples are)."""
    torch.manual_seed(0)
    return randomize_batch_norms(BUILDERS[family][0](small)).eval()


def hand_deploy(family: str, model: nn.Module) -> nn.Module:
    """The family's hand-written deploy model, converted block by block from ``model`` (left unchanged)."""
    return BUILDERS[family][1](model).eval()


# ---------------------------------------------------------------------------------------------------------------
# Measuring and printing.
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One family's figures: executed ops, stored weights and errors of the three forms."""

    family: str
    input: tuple[int, ...]
    ops: dict[str, dict[str, int]]  # form ("before", "fxreparam", "hand") -> executed_ops
    weights: dict[str, int]  # form -> stored_elements
    error_fxreparam: float
    error_hand: float
    folded: nn.Module


def measure(family: str, size: int = 32, small: bool = False) -> Row:
    """Build ``family``, fold it with fxreparam and by hand, and measure all three forms on one input."""
    model = build(family, small)
    x = torch.randn(1, 3, size, size)
    folded = fxreparam.optimize(model, x)
    hand = hand_deploy(family, model)
    forms = {"before": model, "fxreparam": folded, "hand": hand}
    with torch.no_grad():
        want = model(x)
        error_fx, error_hand = relative_error(want, folded(x)), relative_error(want, hand(x))
    return Row(family, tuple(x.shape), {k: executed_ops(m, x) for k, m in forms.items()},
               {k: stored_elements(m) for k, m in forms.items()}, error_fx, error_hand, folded)


def losses(row: Row) -> list[str]:
    """Where fxreparam's result is worse than the hand form: more ops of a kind, > 1.05x weights, more MACs."""
    fx, hand = row.ops["fxreparam"], row.ops["hand"]
    out = [f"{k}: {fx[k]} > {hand[k]}" for k in ("conv", "linear", "batch_norm", "add", "macs") if fx[k] > hand[k]]
    if row.weights["fxreparam"] > 1.05 * row.weights["hand"]:
        out.append(f"weights: {row.weights['fxreparam']} > 1.05 x {row.weights['hand']}")
    return out


def _ops(ops: dict[str, int]) -> str:
    """conv/linear/BN/add counts as one cell."""
    return f"{ops['conv']}/{ops['linear']}/{ops['batch_norm']}/{ops['add']}"


def _triple(before: int, fx: int, hand: int) -> str:
    """before / fxreparam / hand, and the fxreparam-to-hand ratio, as one cell."""
    return f"{before:,} / {fx:,} / {hand:,} ({fx / hand:.3f}x)"


def markdown_row(row: Row) -> str:
    """The family's line of the table."""
    o, w = row.ops, row.weights
    cells = [row.family, "x".join(map(str, row.input)), _ops(o["before"]), _ops(o["fxreparam"]), _ops(o["hand"]),
             _triple(w["before"], w["fxreparam"], w["hand"]),
             _triple(o["before"]["macs"], o["fxreparam"]["macs"], o["hand"]["macs"]),
             f"{row.error_fxreparam:.1e}", f"{row.error_hand:.1e}"]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| family | input | ops before (conv/lin/BN/add) | ops fxreparam | ops hand deploy "
          "| weights before / fxreparam / hand (fx/hand) | MACs before / fxreparam / hand (fx/hand) "
          "| rel. err fxreparam | rel. err hand |\n|---|---|---|---|---|---|---|---|---|")


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    """Print the table for every family (or those named), then any family where fxreparam lost to the hand form."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"any of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--small", action="store_true", help="the tests' small widths instead of the examples'")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if unknown := set(args.families) - set(FAMILIES):
        parser.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    torch.set_num_threads(args.threads)
    widths = "small widths" if args.small else "the examples' widths"
    print(f"{date.today()}, torch {torch.__version__}, CPU {cpu_name()}, {torch.get_num_threads()} threads, {widths}, "
          "batch-norm statistics random\n")
    print(HEADER)
    lost = []
    for family in args.families or FAMILIES:
        row = measure(family, args.size, args.small)
        print(markdown_row(row), flush=True)
        if losses(row):
            lost.append((row, losses(row)))
    for row, why in lost:
        print(f"\nfxreparam is worse than the hand form on {row.family}: {'; '.join(why)}")
        print(fxreparam.report(row.folded))


if __name__ == "__main__":
    main()
