"""RMNet-like blocks through ``fxreparam.optimize``: channels kept as they are beside BNs and convs on the others
(REPARAM §15, the ``channel_slices`` pass with ``conv_bn`` and ``branch_sum``)."""

import torch
import torch.nn.functional as F
from torch import nn

import fxreparam
from fxreparam.testing import executed_ops, randomize_batch_norms


def rel_err(want: torch.Tensor, got: torch.Tensor) -> float:
    return float((want - got).detach().abs().max() / want.detach().abs().max())


def cats(folded) -> int:
    return sum(n.op == "call_function" and "cat" in str(n.target) for n in folded.graph.nodes)


class PartialBN(nn.Module):
    """A conv whose first ``r`` channels pass through and whose others get a BN, then a ReLU."""

    def __init__(self, planes: int, r: int):
        super().__init__()
        self.conv, self.bn, self.r = nn.Conv2d(planes, planes, 3, padding=1), nn.BatchNorm2d(planes - r), r

    def forward(self, x):
        y = self.conv(x)
        return F.relu(torch.cat([y[:, :self.r], self.bn(y[:, self.r:])], dim=1))


class RMBlock(nn.Module):
    """RMNet's RMBlock as its authors write it: ``x[:, :r]`` kept; 3x3-BN + 1x1-BN + a BN of ``x[:, r:]`` summed
    in place for the other channels."""

    def __init__(self, planes: int, ratio: float = 0.5):
        super().__init__()
        self.r = int(planes * ratio)
        rest = planes - self.r
        self.conv33, self.bn33 = nn.Conv2d(planes, rest, 3, padding=1, bias=False), nn.BatchNorm2d(rest)
        self.conv11, self.bn11 = nn.Conv2d(planes, rest, 1, bias=False), nn.BatchNorm2d(rest)
        self.bn00 = nn.BatchNorm2d(rest)

    def forward(self, x):
        out = self.bn33(self.conv33(x))
        out += self.bn11(self.conv11(x))
        out += self.bn00(x[:, self.r:])
        return F.relu(torch.cat([x[:, :self.r], out], dim=1))


def test_partial_bn_blocks_fold_to_plain_convs():
    model = randomize_batch_norms(nn.Sequential(*[PartialBN(8, r) for r in (2, 4, 6)])).eval()
    x = torch.randn(2, 8, 10, 10)
    folded = fxreparam.optimize(model, x)
    rep = fxreparam.report(folded)
    assert (rep.after.batch_norm, rep.after.conv, cats(folded)) == (0, 3, 0)
    assert rep.rewrites["channel_slices"] == 3
    assert rel_err(model(x), folded(x)) < 1e-5


def test_rmnet_blocks_fold_their_bns_and_sums_and_keep_the_cheaper_cat():
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    model = randomize_batch_norms(nn.Sequential(stem, *[RMBlock(8, ratio) for ratio in (0.5, 0.25, 0.75)])).eval()
    x = torch.randn(2, 3, 10, 10)
    folded = fxreparam.optimize(model, x)
    rep = fxreparam.report(folded)
    ops = executed_ops(folded, x)
    assert (rep.after.batch_norm, rep.after.add_sub, rep.after.conv) == (0, 0, 4), ops
    assert rel_err(model(x), folded(x)) < 1e-5
    assert rep.after.parameters <= rep.before.parameters and rep.after.macs <= rep.before.macs
    # The authors' deploy form stores each kept channel as a Dirac row of a dense 3x3 conv: more weights than the
    # block's own convs, so the cat stays, declined with the cost it would add.
    assert cats(folded) == 3
    declined = [r for r in rep.refusals if r.pass_name == "channel_slices" and r.declined]
    assert len(declined) == 3 and all("block kernel" in r.reason for r in declined)
