"""``fxreparam.expand``: replace a model's convs by training-time blocks that fold back to them."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import Counter
from collections.abc import Callable

from torch import fx, nn

from .blocks import ACBlock, DiverseBranchBlock, MobileOneBlock, RepVGGBlock

__all__ = ["STYLES", "expand"]

STYLES: dict[str, type[nn.Module]] = {"repvgg": RepVGGBlock, "acnet": ACBlock, "dbb": DiverseBranchBlock,
                                      "mobileone": MobileOneBlock}


def expand(model: nn.Module, style: str, *, where: Callable[[str, nn.Module], bool] | None = None,
           conv_branches: int = 3) -> nn.Module:
    """A copy of ``model`` whose convs are training-time blocks of ``style``, computing the same function.

    Args:
        model: any module; it is deep-copied and never modified.
        style: ``"repvgg"`` (kxk-BN + 1x1-BN + identity BN), ``"acnet"`` (kxk-BN + 1xk-BN + kx1-BN), ``"dbb"``
            (kxk-BN + 1x1-BN + 1x1-BN-avg-BN + 1x1-BN-kxk-BN) or ``"mobileone"`` (``conv_branches`` kxk-BN +
            1x1-BN + identity BN).
        where: ``where(qualified_name, conv) -> bool`` chooses the convs to expand (default: every eligible one).
        conv_branches: MobileOne's number of kxk-BN branches, the model's own conv included.

    Returns:
        The expanded copy, in the model's train/eval mode. A ``Conv2d`` followed by a ``BatchNorm2d`` (read from
        the traced graph, or from ``nn.Sequential`` order where the model does not trace) is expanded with its
        BN, which becomes the main branch's BN (the BN's own slot then holds an ``nn.Identity``). Each added
        branch ends in a BN with zero weight and bias, so the copy computes the model's function exactly, in
        eval and in train mode, until training moves them. Eligible: ``nn.Conv2d`` with a square odd kernel,
        dilation 1 and zero padding, any stride and groups; 1x1 convs get the branches that apply to them
        (repvgg: the identity BN; mobileone: 1x1 branches and the identity BN; acnet and dbb: none). Transposed,
        dilated, non-square, even-sized and non-zero-padding-mode convs are left alone; if nothing is expanded,
        a warning says why. ``fxreparam.optimize(expanded.eval(), x)`` folds every block back into one conv.
    """
    if style not in STYLES:
        raise ValueError(f"unknown expand style {style!r}; the styles are {', '.join(map(repr, STYLES))}")
    if conv_branches < 1:
        raise ValueError(f"conv_branches must be at least 1, not {conv_branches}")
    model = copy.deepcopy(model)
    inside_blocks = {id(m) for block in model.modules() if isinstance(block, tuple(STYLES.values()))
                     for m in block.modules()}
    pairs, blocked = _conv_bn_pairs(model)
    skipped: Counter[str] = Counter()
    blocks: dict[int, nn.Module] = {}
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        why = ("inside an expanded block" if id(conv) in inside_blocks else blocked.get(id(conv))
               or _why_not_eligible(conv))
        if why is None and where is not None and not where(name, conv):
            why = "not chosen by `where`"
        bn = pairs.get(id(conv))
        if why is None and bn is None and conv.bias is None:
            why = "no bias and no BN found after it (the branches' BNs would give the folded conv a bias)"
        block = None
        if why is None:
            options = {"conv_branches": conv_branches} if style == "mobileone" else {}
            block = STYLES[style].from_conv(conv, bn, **options)
            why = None if block is not None else f"1x1 convs get no {style} branch"
        if block is None:
            skipped[why] += 1
            continue
        blocks[id(conv)] = block.train(conv.training)
        if bn is not None:
            blocks[id(bn)] = nn.Identity()  # the BN now sits in the block's main branch
    slots = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    for parent, name, child in slots:  # every slot holding the conv (or its BN), shared modules included
        if id(child) in blocks:
            setattr(parent, name, blocks[id(child)])
    if not blocks:
        reasons = "; ".join(f"{n} x {why}" for why, n in skipped.most_common()) or "the model has no Conv2d"
        warnings.warn(f"fxreparam.expand(style={style!r}) expanded no conv of {type(model).__name__} ({reasons}); "
                      "it returns an unchanged copy", stacklevel=2)
    return model


def _why_not_eligible(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` gets no block (whatever the style), or ``None``."""
    if type(conv).forward is not nn.Conv2d.forward:
        return "a Conv2d subclass with its own forward"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return "a lazy conv not yet initialized"
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0:
        return "a non-square or even-sized kernel"
    if tuple(conv.dilation) != (1, 1):
        return "a dilated conv"
    if conv.padding_mode != "zeros":
        return f"padding mode {conv.padding_mode!r}"
    return None


def _conv_bn_pairs(model: nn.Module) -> tuple[dict[int, nn.BatchNorm2d], dict[int, str]]:
    """``{id(conv): bn}`` for each conv whose output only a BN reads, and the convs that must stay as they are.

    Read from ``torch.fx.symbolic_trace`` (each module called once, the BN the conv's only reader); where the model
    does not trace, from adjacent ``Conv2d``, ``BatchNorm2d`` children of plain ``nn.Sequential`` containers.
    """
    modules = dict(model.named_modules())
    registered = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # any Python the tracer cannot follow: fall back on container order
        return _sequential_pairs(model, registered), {}
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs: dict[int, nn.BatchNorm2d] = {}
    blocked: dict[int, str] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and "." in node.target:  # e.g. ``F.conv2d(x, self.conv.weight)``
            owner = modules.get(node.target.rsplit(".", 1)[0])
            if isinstance(owner, nn.Conv2d):
                blocked[id(owner)] = "its parameters are read outside its forward"
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        conv = modules[node.target]
        bn = modules.get(user.target) if user.op == "call_module" else None
        if _pairs(conv, bn) and user.args == (node,) and calls[node.target] == calls[user.target] == 1 \
                and registered[id(conv)] == registered[id(bn)] == 1:
            pairs[id(conv)] = bn
    return pairs, blocked


def _sequential_pairs(model: nn.Module, registered: Counter[int]) -> dict[int, nn.BatchNorm2d]:
    pairs: dict[int, nn.BatchNorm2d] = {}
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        children = list(seq.children())
        for conv, bn in itertools.pairwise(children):
            if _pairs(conv, bn) and registered[id(conv)] == registered[id(bn)] == 1:
                pairs[id(conv)] = bn
    return pairs


def _pairs(conv: nn.Module, bn: nn.Module | None) -> bool:
    """Whether ``bn`` can become the BN of ``conv``'s main branch: a standard BN with running statistics."""
    return (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.num_features == conv.out_channels)
