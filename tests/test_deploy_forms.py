"""fxreparam folds every example family at least as far as the papers' hand-written deploy forms do."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from deploy_forms import FAMILIES, Row, build, hand_deploy, losses, measure

SIZE = 32  # 1x3x32x32, small widths: the whole file runs in well under a minute


@functools.cache
def row(family: str) -> Row:
    """One measurement per family, shared by the tests below (the fold is the slow part)."""
    if family == "MobileOne":
        pytest.importorskip("timm", reason="timm is a test dependency: pip install -e '.[test]'")
    return measure(family, SIZE, small=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_deploy_form_matches_the_training_structure(family: str) -> None:
    """The hand conversion is right: it computes what the training structure does, without a BN or an add."""
    r = row(family)
    assert r.error_hand < 1e-5
    assert r.ops["hand"]["batch_norm"] == 0 and r.ops["hand"]["add"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_fxreparam_is_at_least_as_lean_as_the_hand_form(family: str) -> None:
    """fxreparam executes at most the hand form's ops and MACs and 1.05x its weights, with the same outputs."""
    r = row(family)
    fx, hand = r.ops["fxreparam"], r.ops["hand"]
    for kind in ("conv", "linear", "batch_norm", "add", "macs"):
        assert fx[kind] <= hand[kind], (kind, fx, hand)
    assert r.weights["fxreparam"] <= 1.05 * r.weights["hand"], r.weights
    assert r.error_fxreparam < 1e-5
    assert not losses(r)


def test_the_resrep_hand_form_prunes_the_zero_compactor_rows() -> None:
    """A quarter of every compactor's rows are zero, so the hand form (and fxreparam, held to it) drops them."""
    convs = [m for m in hand_deploy("ResRep", build("ResRep", small=True)).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [6, 12, 12, 24, 24]
