"""A real detector nobody here wrote: ultralytics' YOLOv8n, built offline from its yaml (random weights, no network),
folded at least as far as ultralytics' own ``model.fuse()``: no more conv, BN or add ops executed per call, at most
1.05x its stored elements, never costlier than the training form, and exact."""

import copy

import pytest
import torch

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
