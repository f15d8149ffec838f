"""fxreparam.expand: exact at initialization, trainable, and folded back by optimize to the original architecture."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxreparam
from fxreparam.expand import STYLES, ACBlock, ConvBN, DiverseBranchBlock, MobileOneBlock, RepVGGBlock
from fxreparam.testing import calibrate_batch_norms, randomize_batch_norms
from fxreparam.verify import relative_error

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = (RepVGGBlock, ACBlock, DiverseBranchBlock, MobileOneBlock)


class Net(nn.Module):
    """Strided, grouped, depthwise (with and without a channel multiplier), cropping (padding < k // 2) and
    over-padded (padding > k // 2) convs, with and without a BN after them; and three convs left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)  # a bias and no BN
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, groups=4, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.dw = nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False)
        self.dw_bn = nn.BatchNorm2d(32)
        self.crop = nn.Conv2d(32, 32, 5, 1, 1, groups=2, bias=False)
        self.crop_bn = nn.BatchNorm2d(32)
        self.wide = nn.Conv2d(32, 32, 3, 2, 2)
        self.mult = nn.Conv2d(32, 64, 3, 1, 1, groups=32)
        self.pw = nn.Conv2d(64, 64, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(64)
        self.up = nn.ConvTranspose2d(64, 16, 2, 2)
        self.dil = nn.Conv2d(16, 16, 3, 1, 2, dilation=2)
        self.refl = nn.Conv2d(16, 16, 3, 1, 1, padding_mode="reflect")
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.down(x)
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = torch.relu(self.crop_bn(self.crop(x)))
        x = torch.relu(self.wide(x))
        x = torch.relu(self.mult(x))
        x = torch.relu(self.pw_bn(self.pw(x)))
        x = self.refl(self.dil(self.up(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(autouse=True, scope="module")
def _native_conv_kernels():
    """oneDNN builds kernels for each new conv shape (seconds per model on this project's 2-core machine, and an
    expanded model has many shapes, each run once or twice here); the native kernels compute the same convs."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


def train_steps(model: nn.Module, x: torch.Tensor, steps: int, *, lr: float = 0.05) -> dict[str, torch.Tensor]:
    """``steps`` SGD steps on random labels in train mode; the gradients of the last step, by parameter name."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    labels = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x)[:, :10], labels).backward()
        opt.step()
    return {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def layers(folded: nn.Module) -> list[tuple]:
    """Every conv and linear layer of a folded module, with its group structure."""
    out = []
    for node in folded.graph.nodes:
        mod = folded.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, nn.modules.conv._ConvNd):
            out.append((type(mod).__name__, tuple(mod.weight.shape), mod.stride, mod.padding, mod.dilation, mod.groups,
                        mod.bias is not None))
        elif isinstance(mod, nn.Linear):
            out.append(("Linear", tuple(mod.weight.shape), mod.bias is not None))
    return out


def assert_folds_back(expanded: nn.Module, deploy: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32
                      ) -> nn.Module:
    """optimize(expanded) has the deploy form's op counts, weights and layers, and computes the expanded model:
    to 1e-5 in float32, or in float64 to 1e-8, for deep models whose own float32 rounding is larger than 1e-5."""
    model = expanded.eval() if dtype == torch.float32 else copy.deepcopy(expanded).to(dtype).eval()
    folded = fxreparam.optimize(model, x.to(dtype), verify=False)  # checked here, on two inputs
    got, want = fxreparam.report(folded), fxreparam.report(deploy)
    assert got.after == want.after, f"{got.after} != {want.after}\nrefused: {got.refusals}"
    assert sorted(layers(folded)) == sorted(layers(deploy))  # the same layers (a fold may move one up the graph)
    with torch.no_grad():
        for inputs in (x.to(dtype), torch.randn_like(x, dtype=dtype)):
            assert relative_error(model(inputs), folded(inputs)) < (1e-5 if dtype == torch.float32 else 1e-8)
    return folded


def assert_exact_at_init(model: nn.Module, expanded: nn.Module, x: torch.Tensor) -> None:
    """The same outputs in eval mode and, on copies (train mode updates BN statistics), in train mode."""
    with torch.no_grad():
        assert relative_error(model.eval()(x), expanded.eval()(x)) < 1e-5
        outputs = []
        for m in (model, expanded):
            torch.manual_seed(0)  # the same dropout masks
            outputs.append(copy.deepcopy(m).train()(x))
        assert torch.equal(*outputs)  # the added branches add exact zeros


@pytest.fixture(scope="module")
def net() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_batch_norms(Net()).eval()
    x = torch.randn(4, 3, 24, 24)
    return model, fxreparam.optimize(model, x), x


@pytest.mark.parametrize("style", STYLES)
def test_own_model_exact_trainable_and_folds_back(style, net):
    model, deploy, x = net
    expanded = fxreparam.expand(model, style)
    assert not expanded.training
    assert_exact_at_init(model, expanded, x)
    assert_folds_back(expanded, deploy, x)  # at initialization
    train_steps(expanded, x, 1)
    grads = train_steps(expanded, x, 2)  # the first step moved the zero BNs: now every parameter learns
    blocks = [m for m in expanded.modules() if isinstance(m, BLOCKS)]
    for name, p in expanded.named_parameters():
        if p.requires_grad and any(p is q for block in blocks for q in block.parameters()):
            assert name in grads and grads[name].abs().sum() > 0, name
    assert_folds_back(expanded, deploy, x)  # after training


def test_which_convs_expand_and_how(net):
    model = net[0]
    kinds = {style: {n: type(m).__name__ for n, m in fxreparam.expand(model, style).named_children()}
             for style in STYLES}
    alone = {"up": "ConvTranspose2d", "dil": "Conv2d", "refl": "Conv2d"}
    assert kinds["dbb"] == {**kinds["dbb"], "stem": "DiverseBranchBlock", "dw": "DiverseBranchBlock",
                            "dw_bn": "Identity", "pw": "Conv2d", "pw_bn": "BatchNorm2d", **alone}
    assert kinds["acnet"]["pw"] == "Conv2d" and kinds["acnet"]["crop"] == "ACBlock"
    assert kinds["repvgg"]["pw"] == "RepVGGBlock" and kinds["repvgg"]["pw_bn"] == "Identity"  # the identity BN
    assert kinds["mobileone"]["pw"] == "MobileOneBlock"
    repvgg = fxreparam.expand(model, "repvgg")
    assert repvgg.stem.rbr_identity is None and repvgg.dw.rbr_identity is not None  # 3 -> 16 vs 32 -> 32
    assert repvgg.wide.rbr_identity is None and repvgg.pw.rbr_1x1 is None  # strided; 1x1 gets the identity alone
    assert isinstance(repvgg.stem.main, nn.Conv2d) and repvgg.stem.main.bias is not None  # no BN: the conv itself
    assert isinstance(repvgg.dw.main, ConvBN) and repvgg.dw.main.bn.running_var.ne(1).any()  # the model's own BN
    assert isinstance(repvgg.down[0].main, ConvBN) and isinstance(repvgg.down[1], nn.Identity)
    assert repvgg.crop.rbr_1x1.crop == (1, 1) and repvgg.crop.rbr_1x1.conv.padding == (0, 0)  # 5x5 with padding 1
    acnet = fxreparam.expand(model, "acnet")
    assert acnet.crop.hor.conv.kernel_size == (1, 5) and acnet.crop.hor.crop == (1, 0)
    assert acnet.wide.ver.conv.padding == (2, 1) and acnet.wide.ver.conv.stride == (2, 2)
    dbb = fxreparam.expand(model, "dbb")
    assert dbb.dw.dbb_1x1_kxk.conv1.out_channels == 64 and not hasattr(dbb.dw.dbb_avg, "conv")  # depthwise
    assert torch.equal(dbb.stem.dbb_1x1_kxk.conv1.weight[:, :, 0, 0], torch.eye(3))  # identity-based 1x1
    assert len(fxreparam.expand(model, "mobileone", conv_branches=4).stem.rbr_conv) == 3


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision(name, style, torchvision_model):
    model, deploy, x = torchvision_model(name)
    expanded = fxreparam.expand(model, style)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    expanded_convs = sum(isinstance(m, BLOCKS) for m in expanded.modules())
    kxk = {"resnet18": 17, "mobilenet_v2": 18}[name]  # the 1x1s get mobileone's branches; none has an identity
    assert expanded_convs == (convs if style == "mobileone" else kxk)
    assert convs == {"resnet18": 20, "mobilenet_v2": 52}[name]
    assert_exact_at_init(model, expanded, x)
    train_steps(expanded, x, 2, lr=0.01)
    zero_bns = [m for b in expanded.modules() if isinstance(b, BLOCKS) for m in b.modules()
                if isinstance(m, nn.BatchNorm2d) and not m.weight.any()]
    assert not zero_bns  # every added branch now contributes
    assert_folds_back(expanded, deploy, x, torch.float64)


@pytest.fixture(scope="module")
def torchvision_model():
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
        if name not in cache:
            torch.manual_seed(0)
            model = getattr(torchvision.models, name)(weights=None)
            with torch.no_grad():  # statistics of real batches: with random ones, activations grow to 1e6 and ReLU6
                calibrate_batch_norms(model, torch.randn(8, 3, 32, 32))  # reads their float32 rounding as signal
                for m in model.modules():  # torchvision zero-inits the classifier's bias; training moves it, and an
                    if isinstance(m, nn.Linear) and m.bias is not None:  # all-zero bias is rightly not stored
                        m.bias.normal_(0, 0.01)
            x = torch.randn(2, 3, 32, 32)
            cache[name] = (model.eval(), fxreparam.optimize(model.eval(), x), x)
        return cache[name]

    return get


def test_model_untouched_and_state_dict_round_trip(net):
    model = net[0]
    before = copy.deepcopy(model.state_dict())
    expanded = fxreparam.expand(model, "dbb")
    train_steps(expanded, net[2], 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training
    again = fxreparam.expand(model, "dbb")
    again.load_state_dict(expanded.state_dict())
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), expanded.eval()(x))


def test_where_chooses_convs(net):
    expanded = fxreparam.expand(net[0], "acnet", where=lambda name, conv: conv.groups > 1)
    assert {n for n, m in expanded.named_modules() if isinstance(m, ACBlock)} == {"down.0", "dw", "crop", "mult"}


def test_unknown_style_and_nothing_to_expand():
    with pytest.raises(ValueError, match="'repvgg', 'acnet', 'dbb', 'mobileone'"):
        fxreparam.expand(nn.Conv2d(3, 3, 3), "ghostnet")
    with pytest.warns(UserWarning, match=r"expanded no conv.*1 x 1x1 convs get no acnet branch"):
        same = fxreparam.expand(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), "acnet")
    assert isinstance(same[0], nn.Conv2d)
    with pytest.warns(UserWarning, match="no bias and no BN found after it"):
        fxreparam.expand(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.GroupNorm(2, 4)), "repvgg")
    with pytest.raises(ValueError, match="conv_branches"):
        fxreparam.expand(nn.Conv2d(3, 3, 3), "mobileone", conv_branches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        once = fxreparam.expand(nn.Sequential(nn.Conv2d(3, 4, 3)), "repvgg")  # a lone conv expands: no warning
    with pytest.warns(UserWarning, match="inside an expanded block"):
        twice = fxreparam.expand(once, "dbb")
    assert isinstance(twice[0], RepVGGBlock) and isinstance(twice[0].main, nn.Conv2d)


class Untraceable(nn.Module):
    """Python control flow on a tensor value: symbolic_trace fails; pairs come from nn.Sequential order."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.conv = nn.Conv2d(8, 8, 3, 1, 1)  # with a bias: expanded even where the BN after it is not seen
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.seq(x)
        return self.bn(self.conv(x)) if x.sum() > 0 else -x


def test_untraceable_model_pairs_from_sequential_order():
    model = randomize_batch_norms(Untraceable()).eval()
    expanded = fxreparam.expand(model, "repvgg")
    assert isinstance(expanded.seq[0].main, ConvBN) and isinstance(expanded.seq[1], nn.Identity)
    assert isinstance(expanded.conv, RepVGGBlock) and isinstance(expanded.bn, nn.BatchNorm2d)  # its BN stays after
    x = torch.randn(2, 3, 8, 8)
    assert_exact_at_init(model, expanded, x)


class Shared(nn.Module):
    """One conv called twice, one whose weight is also read directly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, 1, 1), nn.BatchNorm2d(4)
        self.other = nn.Conv2d(4, 4, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(self.conv(x)))
        return self.other(y) + self.other.weight.sum()


def test_shared_and_directly_read_convs():
    model = randomize_batch_norms(Shared()).eval()
    expanded = fxreparam.expand(model, "mobileone")
    assert isinstance(expanded.conv, MobileOneBlock) and isinstance(expanded.conv.main, nn.Conv2d)  # called twice
    assert isinstance(expanded.bn, nn.BatchNorm2d) and isinstance(expanded.other, nn.Conv2d)
    x = torch.randn(2, 4, 8, 8)
    assert_exact_at_init(model, expanded, x)


def _compiled_step_matches(backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, 2, 1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    eager = fxreparam.expand(model, "dbb")
    train_steps(eager, torch.randn(4, 3, 16, 16), 1)  # the zero BNs move: every branch counts
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled, backend=backend)
    x = torch.randn(4, 3, 16, 16)
    grads = [train_steps(m, x, 1, lr=0.0) for m in (eager, step)]
    scale = max(g.abs().max() for g in grads[0].values())
    assert grads[0].keys() == grads[1].keys()
    assert all((grads[0][k] - grads[1][k]).abs().max() < 1e-4 * scale for k in grads[0])


def test_trains_under_torch_compile():
    _compiled_step_matches("aot_eager")  # Dynamo and AOTAutograd: what inductor compiles, without the C++ build


@pytest.mark.slow
def test_trains_under_torch_compile_inductor():
    _compiled_step_matches("inductor")


@pytest.mark.slow
def test_expand_digits_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "expand_digits.py"), "--epochs", "2"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    assert "dbb folded" in out and "refused: 0" in out
