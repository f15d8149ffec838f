"""``inference_identities`` alone: eval-mode dropout and ``nn.Identity`` go, so the folds around them can happen."""

import torch
import torch.nn.functional as F
from torch import nn

from fxreparam.testing import run_pass


def test_dropout_module_and_identity_go():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.3), nn.Identity(), nn.BatchNorm2d(4))
    run = run_pass("inference_identities", model, torch.randn(1, 3, 5, 5))
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
