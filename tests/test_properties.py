"""Property tests: random sums of conv, BN and identity branches either fold exactly or are refused."""

from __future__ import annotations

import torch
from conftest import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxreparam
from fxreparam.testing import randomize_batch_norms

KERNELS = [(1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (2, 2)]


class RandomBranches(nn.Module):
    def __init__(self, specs, identity, channels):
        super().__init__()
        self.branches = nn.ModuleList()
        for k, stride, groups, dilation, mode, bn in specs:
            pad = tuple(dilation * (kk - 1) // 2 for kk in k)
            conv = nn.Conv2d(channels, channels, k, stride, pad, dilation, groups, bias=not bn, padding_mode=mode)
            self.branches.append(nn.Sequential(conv, nn.BatchNorm2d(channels)) if bn else conv)
        self.identity = nn.BatchNorm2d(channels) if identity else None

    def forward(self, x):
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out + self.identity(x) if self.identity is not None else out


branch = st.tuples(st.sampled_from(KERNELS), st.just(1), st.sampled_from([1, 2, 4]), st.sampled_from([1, 2]),
                   st.sampled_from(["zeros", "zeros", "reflect"]), st.booleans())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(branch, min_size=2, max_size=4), identity=st.booleans(), stride=st.sampled_from([1, 2]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_random_branch_sums_fold_exactly_or_are_refused(specs, identity, stride, dtype, seed):
    torch.manual_seed(seed)
    # Every branch shares the stride; even kernels do not center-pad, so they keep "same" size only at k=2, d=1.
    specs = [(k, stride, g, 1 if 2 in k else d, m, bn) for k, _, g, d, m, bn in specs]
    identity = identity and stride == 1
    model = randomize_batch_norms(RandomBranches(specs, identity, 8), seed=seed).to(dtype).eval()
    x = torch.randn(2, 8, 11, 11, dtype=dtype)
    try:
        expected = model(x)
    except RuntimeError:
        return  # branches of different output sizes: not a valid model
    folded = fxreparam.optimize(model, x, capture="symbolic_trace")
    bound = 1e-12 if dtype == torch.float64 else 1e-5
    with torch.no_grad():
        assert rel_err(expected, folded(x)) < bound
    rep = fxreparam.report(folded)
    assert rep.after.conv <= rep.before.conv
    if rep.after.conv > 1:
        assert rep.refusals, "branches left unmerged without a reason"
