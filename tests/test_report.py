"""The report: refusals for exactness apart from declines for cost, and the whole result against its input."""

import warnings

import torch
from torch import nn

import fxreparam
from fxreparam.cost import Footprint, result_costlier
from fxreparam.report import OpCounts, _whole_result
from fxreparam.testing import randomize_batch_norms


class _DeclinedAndRefused(nn.Module):
    """A 3x3 then a 3x3 (not composed: no structure to fold), a Linear pair whose composition would store more
    (declined for cost) and a BN that no layer precedes (refused: not exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.down, self.up = nn.Linear(64, 2), nn.Linear(2, 64)

    def forward(self, x):
        y = self.conv(torch.relu(self.bn(x))).flatten(1)
        return self.up(self.down(y))


def test_declines_for_cost_are_listed_apart_from_refusals_with_counts():
    model = randomize_batch_norms(_DeclinedAndRefused()).eval()
    rep = fxreparam.report(fxreparam.optimize(model, torch.randn(2, 3, 6, 6)))
    declined = [r for r in rep.refusals if r.declined]
    refused = [r for r in rep.refusals if not r.declined]
    assert declined and refused
    text = str(rep)
    assert f"declined (costlier) ({len(declined)}):" in text
    assert f"refused (not exact) ({len(refused)}):" in text
    head, tail = text.split("declined (costlier)")
    assert all(r.reason in tail and r.reason not in head for r in declined)


def _counts(parameters: int, macs: int, conv: int) -> OpCounts:
    return OpCounts(conv=conv, linear=0, batch_norm=0, add_sub=0, mul_div=0, other=0, parameters=parameters,
                    macs=macs)


def test_whole_result_line_gives_ratios_and_warns_when_the_output_costs_more():
    fine = _whole_result(_counts(100, 1000, 2), _counts(80, 1000, 1))
    assert fine == ["whole result (input -> output): stored elements 100 -> 80 (0.800x); MACs per sample 1,000 -> "
                    "1,000 (1.000x); conv 2 -> 1 (0.500x); linear 0 -> 0 (1.000x); batch_norm 0 -> 0 (1.000x); "
                    "elementwise 0 -> 0 (1.000x)"]
    worse = _whole_result(_counts(100, 1000, 2), _counts(196, 1440, 2))
    assert len(worse) == 2 and worse[1].startswith("WARNING: the result costs more than its input")
    assert "stored elements 196 > 100" in worse[1] and "MACs per sample 1,440 > 1,000" in worse[1]


def test_result_costlier_names_each_measure_that_grew():
    before = Footprint(stored=10, macs=10, conv=1, linear=0, batch_norm=1, elementwise=2)
    assert result_costlier(before, before) is None
    assert result_costlier(before, Footprint(10, 10, 1, 0, 0, 3)) == \
        "the result costs more than its input: elementwise 3 > 2"


def test_folded_report_shows_the_whole_result_line():
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    text = str(fxreparam.report(fxreparam.optimize(model, torch.randn(1, 3, 6, 6))))
    assert "whole result (input -> output): stored elements 128 -> 112 (0.875x)" in text
    assert "WARNING" not in text


def test_precomputed_constants_are_shown_and_allowed_within_their_count():
    before, after = _counts(1000, 50, 1), _counts(1008, 50, 1)
    lines = _whole_result(before, after, precomputed=8)
    assert len(lines) == 1 and "precomputed constants: 8 stored elements (budget: 1% of the input's)" in lines[0]
    assert result_costlier(Footprint(1000, 50), Footprint(1008, 50), precomputed=8) is None
    assert "stored elements 1,009 > 1,008" in result_costlier(Footprint(1000, 50), Footprint(1009, 50), precomputed=8)


def test_report_costlier_states_the_whole_result_guarantee():
    folded = fxreparam.optimize(randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval(),
                                torch.randn(2, 3, 6, 6))
    assert fxreparam.report(folded).costlier is None
    # A lone average pool and its BN are no longer made a costlier depthwise conv (issue 21): declined, not grown.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pooled = fxreparam.optimize(randomize_batch_norms(nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4)))
                                    .eval(), torch.randn(2, 4, 6, 6))
    report = fxreparam.report(pooled)
    assert report.costlier is None and any(r.pass_name == "pool_as_conv" and r.declined for r in report.refusals)
