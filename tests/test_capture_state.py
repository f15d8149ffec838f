"""State on every capture path: buffer writes in forward are kept in the folded graph or refused naming the buffer."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import fxreparam
from fxreparam.capture import capture


class Counter(nn.Module):
    """A conv whose output is scaled by a call counter the forward advances (``write`` says how)."""

    def __init__(self, write: str) -> None:
        super().__init__()
        self.conv, self.write = nn.Conv2d(3, 4, 1), write
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write == "add_":
            self.count.add_(1)
        elif self.write == "copy_":
            self.count.copy_(self.count + 1)
        else:
            self.count = self.count + 1
        return self.conv(x) * self.count


def twin(model: Counter) -> Counter:
    """A fresh model with ``model``'s weights and state."""
    other = Counter(model.write).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("write", ["add_", "copy_"])
@pytest.mark.parametrize("inputs", [False, True], ids=["symbolic_trace", "export"])
def test_an_in_place_buffer_write_is_kept_in_the_folded_graph(write, inputs):
    model, x = Counter(write).eval(), torch.randn(2, 3, 4, 4)
    reference = twin(model)
    folded = fxreparam.optimize(model, x if inputs else None, verify=False)
    with torch.no_grad():
        for _ in range(3):
            assert torch.allclose(folded(x), reference(x), atol=1e-6)
    assert float(model.count) == 0.0  # the user's model is untouched


def test_symbolic_trace_refuses_a_buffer_assigned_in_forward_naming_it_and_leaves_the_model_alone():
    model = Counter("assign").eval()
    with pytest.raises(fxreparam.CaptureError, match=r"buffer 'count'"):
        capture(model, None)
    assert isinstance(model.count, torch.Tensor) and float(model.count) == 0.0


def test_symbolic_trace_does_not_advance_the_model_it_traces():
    model = Counter("add_").eval()
    capture(model, None)
    assert float(model.count) == 0.0


class ViewAfterFold(nn.Module):
    """BN, two 1x1 Conv1d (composed into one kernel), an average pool, then an in-place write through a view."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.pool = nn.BatchNorm1d(4), nn.AvgPool1d(2)
        self.first, self.second = nn.Conv1d(4, 6, 1), nn.Conv1d(6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.second(self.first(self.bn(x))))
        y.view(-1).mul_(0.5)
        return y


@pytest.mark.parametrize("method", ["export", "symbolic_trace", None])
def test_a_view_of_a_folded_value_still_works(method):
    model, x = ViewAfterFold().eval(), torch.randn(2, 4, 8)
    inputs = {"example_inputs": x, "capture": method} if method else {}
    folded = fxreparam.optimize(model, verify=False, **inputs)
    assert sum(isinstance(m, nn.Conv1d) for m in folded.modules()) == 1  # the two convs and the BN did fold
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_finalize_makes_unwritten_views_reshapes_and_keeps_written_ones():
    from fxreparam.finalize import finalize

    class Views(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            read = (x + 1).view(-1)
            written = x * 2
            written.view(-1).add_(1)
            return read, written

    methods = [n.target for n in finalize(fx.symbolic_trace(Views())).graph.nodes if n.op == "call_method"]
    assert methods.count("reshape") == 1 and methods.count("view") == 1


class AnchorCache(nn.Module):
    """A conv-BN whose forward caches an anchor row on the module the first time it sees a size, over class-level
    defaults (as RT-DETR's decoder does with its anchors)."""

    anchors = torch.empty(0)
    shapes: tuple[int, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shapes = tuple(x.shape[2:])
        if self.shapes != shapes:
            self.anchors, self.shapes = torch.linspace(-1, 1, x.shape[-1]).exp(), shapes
        return self.bn(self.conv(x)) * self.anchors


def test_a_model_that_caches_on_itself_in_its_first_forward_is_captured_after_one_run():
    model, x = AnchorCache().eval(), torch.randn(2, 3, 6, 6)
    folded = fxreparam.optimize(model, x)
    assert "anchors" not in vars(model) and "shapes" not in vars(model)  # the user's model is as it was
    assert any("first call" in note for note in capture(model, (x,)).notes)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_a_forward_that_assigns_a_tensor_attribute_on_every_call_is_refused_naming_it():
    class Calls(nn.Module):
        calls = torch.zeros(())

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls = self.calls + 1
            return self.conv(x) * self.calls

    with pytest.raises(fxreparam.CaptureError, match=r"attribute 'calls'.*every call"):
        capture(Calls().eval(), (torch.randn(2, 3, 4, 4),), method="export")


class Switch(nn.Module):
    """A conv-BN whose forward branches in Python on a flag buffer; ``write`` also clears the flag (ActNorm-style)."""

    def __init__(self, write: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.write = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), write
        self.register_buffer("on", torch.ones((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.on:
            if self.write:
                self.on.fill_(False)
            return y
        return -y


def test_symbolic_trace_takes_a_python_branch_on_a_buffer_it_only_reads():
    model, x = Switch(write=False).eval(), torch.randn(2, 3, 4, 4)
    folded = fxreparam.optimize(model)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-6)


def test_symbolic_trace_refuses_a_write_into_a_buffer_its_python_branches_on_and_puts_it_back():
    model = Switch(write=True).eval()
    with pytest.raises(fxreparam.CaptureError, match=r"buffer\(s\) 'on'"):
        capture(model, None)
    assert bool(model.on)


@pytest.mark.parametrize("grad", [False, True])
def test_an_attribute_recomputed_before_it_is_read_on_every_call_is_no_state(grad):
    """Old-style spectral_norm sets ``weight`` from ``weight_orig`` at every call before the conv reads it: a per-call
    cache, not state, so export folds it (it was refused as state a graph cannot keep)."""
    from fxreparam.testing import randomize_batch_norms

    model = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)), nn.BatchNorm2d(4)).train()
    with torch.set_grad_enabled(grad):
        model(torch.randn(2, 3, 6, 6))  # power iterations; under autograd the stored weight is a non-leaf
    model = randomize_batch_norms(model).eval()
    x = torch.randn(2, 3, 6, 6)
    captured = capture(model, (x,))
    assert captured.method.startswith("torch.export")
    assert any("every call before reading it" in note for note in captured.notes)
    folded = fxreparam.optimize(model, x)
    assert fxreparam.report(folded).after.batch_norm == 0
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_an_attribute_read_before_it_is_assigned_again_is_state_and_refused():
    class Previous(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.prev = torch.zeros(1, 3, 4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x) + self.prev
            self.prev = out.detach()
            return out

    with pytest.raises(fxreparam.CaptureError, match=r"attribute 'prev'.*every call"):
        capture(Previous().eval(), (torch.randn(1, 3, 4, 4),), method="export")
