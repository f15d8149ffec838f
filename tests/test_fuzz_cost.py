"""The whole-result guarantee, fuzzed: a random model from ``test_fuzz``'s vocabulary folds to a result that costs no
more than the graph it was given (stored elements beyond the precompute budget, MACs per sample, conv, linear, BN
and elementwise ops), as :attr:`fxreparam.Report.costlier` states it. Exactness is ``test_fuzz``'s matter (its CI
examples are fixed); models ``optimize`` refuses whole are left out here.
``FXREPARAM_FUZZ_COST_EXAMPLES=N`` runs N models (100 by default).
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_fuzz import CHANNELS, RandomNet, op_with_sources, run

import fxreparam
from fxreparam.testing import randomize_batch_norms


@settings(max_examples=int(os.environ.get("FXREPARAM_FUZZ_COST_EXAMPLES", 100)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(dims=st.sampled_from([1, 2, 2, 3]), ops=st.lists(op_with_sources, min_size=1, max_size=8),
       dtype=st.sampled_from([torch.float32, torch.float64]), capture=st.sampled_from(["export", "symbolic_trace"]),
       seed=st.integers(0, 2**16))
def test_random_models_never_fold_to_a_costlier_result(dims, ops, dtype, capture, seed):
    torch.manual_seed(seed)
    model = randomize_batch_norms(RandomNet(dims, ops), seed=seed).to(dtype).eval()
    x = torch.randn((2, CHANNELS) + (6,) * dims, dtype=dtype)
    try:  # reflect padding on a small size, a BN without statistics: fails in eager already
        run(copy.deepcopy(model), x)
    except (RuntimeError, ValueError):
        assume(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the core warns where the result costs more; the assertion says it here
        try:
            folded = fxreparam.optimize(model, x, capture=capture)
        except fxreparam.FxReparamError:
            assume(False)
    costlier = fxreparam.report(folded).costlier
    assert costlier is None, f"{costlier}: dims={dims} ops={ops} {dtype} {capture} seed={seed}"
