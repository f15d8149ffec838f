"""``inference_identities`` alone: eval-mode dropout and ``nn.Identity`` go, so the folds around them can happen."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxreparam.testing import run_pass


def test_dropout_module_and_identity_go():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.3), nn.Identity(), nn.BatchNorm2d(4))
    run = run_pass("inference_identities", model, torch.randn(1, 3, 5, 5), capture="symbolic_trace")  # the modules
    assert (run.rewrites, run.error) == (2, 0.0)
    assert not run.layers(nn.Dropout) and not run.layers(nn.Identity)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.2, training=self.training)) + F.dropout(x, 0.5, training=True).sum()


def test_functional_dropout_goes_only_when_not_training():
    run = run_pass("inference_identities", _Functional(), torch.zeros(2, 4))
    assert run.rewrites == 1  # training=self.training is False in eval; training=True stays (it is random)


def test_exported_dropout_goes_and_the_pipeline_reaches_a_fixpoint():
    """torch.export keeps ``aten.dropout(x, p, False)``; dead-code elimination keeps it too (it is seeded-random),
    so the pass must erase it itself, or it would match again every round until the round limit."""
    import fxreparam

    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.BatchNorm1d(8)).eval()
    folded = fxreparam.optimize(model, torch.randn(2, 4))
    rep = fxreparam.report(folded)
    assert rep.rounds == 2 and rep.rewrites["inference_identities"] <= 1
    assert not any("dropout" in str(n.target) for n in folded.graph.nodes)


class _ConvDropBN(nn.Module):
    def __init__(self, drop, dims=2):
        super().__init__()
        conv, bn = {2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.conv, self.drop, self.bn = conv(3, 4, 3), drop, bn(4)

    def forward(self, x):
        return self.bn(self.drop(self.conv(x)))


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


_VARIANTS = {
    "Dropout2d": (nn.Dropout2d(0.3), 2), "Dropout3d": (nn.Dropout3d(0.3), 3), "AlphaDropout": (nn.AlphaDropout(), 2),
    "FeatureAlphaDropout": (nn.FeatureAlphaDropout(), 2),
    "F.feature_alpha_dropout": (_Call(lambda x: F.feature_alpha_dropout(x, 0.5, False)), 2),
    "torch.feature_dropout": (_Call(lambda x: torch.feature_dropout(x, 0.5, False)), 2),
    "torch.alpha_dropout": (_Call(lambda x: torch.alpha_dropout(x, 0.5, False)), 2),
}


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_every_eval_dropout_variant_goes_and_unblocks_the_conv_bn_fold(variant, capture):
    import fxreparam

    drop, dims = _VARIANTS[variant]
    model, x = _ConvDropBN(drop, dims).eval(), torch.randn(2, 3, *(6,) * dims)
    folded = fxreparam.optimize(model, x, capture=capture, verify=False)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() < 1e-5
    assert not any("dropout" in str(n.target) for n in folded.graph.nodes)
    assert fxreparam.report(folded).after.batch_norm == 0


class _AlphaByDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.feature_alpha_dropout(F.alpha_dropout(x, 0.1), 0.1))  # training defaults to False here


def test_functional_alpha_dropouts_go_at_their_own_default():
    """``F.alpha_dropout`` and ``F.feature_alpha_dropout`` default to ``training=False`` (unlike ``F.dropout``): called
    without it they are the identity, and go."""
    run = run_pass("inference_identities", _AlphaByDefault(), torch.randn(2, 4))
    assert (run.rewrites, run.error) == (2, 0.0)
