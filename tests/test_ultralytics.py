"""Real detectors nobody here wrote: ultralytics' YOLOv8n and YOLOv10n (also end-to-end), built offline from their
yaml (random weights, no network), folded at least as far as ultralytics' own ``model.fuse()``: no more conv, BN or
add ops executed per call, at most 1.05x its stored elements, never costlier than the training form, and exact.
RT-DETR-l folds before its first forward, in float64 too (its anchor cache survives the capture).

YOLOv10 is compared on its detections (the first output, what ultralytics' export returns): ``fuse()`` drops the head
the detections do not read, and with it part of the raw outputs, which fxreparam must keep where they are outputs."""

import copy

import pytest
import torch
from torch import nn

import fxreparam
from fxreparam.testing import executed_ops, randomize_batch_norms, stored_elements
from fxreparam.verify import relative_error

tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics is not installed (pip install ultralytics)")


@pytest.fixture(scope="module")
def yolov8n():
    torch.manual_seed(0)
    model = randomize_batch_norms(tasks.DetectionModel("yolov8n.yaml", verbose=False)).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        model(x)  # ultralytics caches the anchor grid on its first call at a shape: measured with it cached
    return model, x, fxreparam.optimize(model, x), copy.deepcopy(model).fuse(verbose=False)


def test_yolov8n_executes_no_more_than_fuse(yolov8n):
    _, x, folded, fused = yolov8n
    ours, theirs = executed_ops(folded, x), executed_ops(fused, x)
    assert ours["conv"] <= theirs["conv"] and ours["batch_norm"] <= theirs["batch_norm"] == 0
    assert ours["add"] <= theirs["add"] and ours["macs"] <= theirs["macs"]


def test_yolov8n_stores_at_most_fuse_and_its_input(yolov8n):
    _, _, folded, fused = yolov8n
    assert stored_elements(folded) <= 1.05 * stored_elements(fused)
    rep = fxreparam.report(folded)
    assert rep.after.parameters <= rep.before.parameters and rep.after.macs <= rep.before.macs
    assert "WARNING" not in str(rep)


def test_yolov8n_is_exact(yolov8n):
    model, x, folded, _ = yolov8n
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-5


class _Detections(nn.Module):
    """A detector's detections alone: the first output of its eval-mode ``(detections, raw outputs)`` tuple."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def _yolov10n(end2end: bool, size: int = 128):
    torch.manual_seed(0)
    built = randomize_batch_norms(tasks.DetectionModel("yolov10n.yaml", verbose=False)).eval()
    built.end2end = end2end
    model, x = _Detections(built).eval(), torch.randn(1, 3, size, size)
    folded = fxreparam.optimize(model, x)  # before the model's first forward
    with torch.no_grad():
        model(x)
    return model, x, folded, _Detections(copy.deepcopy(built).fuse(verbose=False)).eval()


@pytest.fixture(scope="module")
def yolov10n():
    return _yolov10n(end2end=False)


def _at_most_fuse(folded: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    ours, theirs = executed_ops(folded, x), executed_ops(fused, x)
    assert ours["conv"] <= theirs["conv"] and ours["batch_norm"] <= theirs["batch_norm"] == 0
    assert ours["add"] <= theirs["add"] and ours["macs"] <= theirs["macs"]
    assert stored_elements(folded) <= 1.05 * stored_elements(fused)
    rep = fxreparam.report(folded)
    assert rep.costlier is None and "WARNING" not in str(rep)


def test_yolov10n_detections_fold_as_far_as_fuse_and_exactly(yolov10n):
    model, x, folded, fused = yolov10n
    _at_most_fuse(folded, fused, x)
    assert executed_ops(folded, x)["conv"] < executed_ops(model, x)["conv"]  # the unread one-to-one head is gone
    with torch.no_grad():
        want = model(x)
        assert relative_error(want, folded(x)) < 1e-5 and relative_error(want, fused(x)) < 1e-5


def test_yolov10n_full_outputs_keep_the_head_fuse_drops(yolov10n):
    # Why the comparison is on the detections: fuse() removes the one-to-one head, whose raw outputs are outputs.
    model, x, _, fused = yolov10n
    with torch.no_grad():
        assert relative_error(model.model(x), fused.model(x)) == float("inf")


@pytest.mark.slow
def test_yolov10n_end_to_end_folds_as_far_as_fuse_and_exactly():
    model, x, folded, fused = _yolov10n(end2end=True)
    _at_most_fuse(folded, fused, x)
    with torch.no_grad():
        want, got = model(x)[0], folded(x)[0]
    # The top-k detections of random weights hold near-tied scores whose order rounding may swap (fuse()'s too):
    # every detection is one of the model's, and the scores agree once sorted.
    assert torch.cdist(got.double(), want.double()).min(1).values.max() <= 1e-5 * want.abs().max()
    assert relative_error(want[:, 4].sort().values, got[:, 4].sort().values) < 1e-5


@pytest.mark.slow
def test_rtdetr_l_folds_before_its_first_forward_in_float64():
    # ultralytics' _apply (model.double()) sets the anchor cache as instance attributes; export used to leave its
    # key (shapes) set beside the empty cache it put back, and verification raised a bare RuntimeError.
    torch.manual_seed(0)
    model = randomize_batch_norms(tasks.RTDETRDetectionModel("rtdetr-l.yaml", verbose=False)).eval().double()
    x = torch.randn(1, 3, 128, 128, dtype=torch.float64)
    folded = fxreparam.optimize(model, x)
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-12
