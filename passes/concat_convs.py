"""``concat_convs``: convs of one input concatenated on the channel axis, as one conv (REPARAM §10, DBB's transIV).

``cat([conv_1(x), ..., conv_n(x)], channels)`` with equal strides and aligned centers is one conv
whose output channels are the stacked kernels, each center-padded to the largest. A BN or affine
on a branch folds first (it is per branch). Stacking kernels of different sizes pads the small
ones with zeros, and a cat that lists one conv twice would compute it twice: where the stack costs
more than the convs it replaces, the fold is declined (``Costlier``). Reads on either side of an
in-place write, or through a crop no padding composes with, are refused.
"""

from __future__ import annotations

from torch import fx

from fxreparam import branches, cost, ops
from fxreparam.graph import emit, position
from fxreparam.meta import rank
from fxreparam.registry import Costlier, NotExact, PassContext, register_pass


def _read_once(inputs: list[fx.Node], where: str) -> None:
    """Refuse (Costlier) a cat that lists one conv's output twice: the stack would compute it twice."""
    twice = next((t for i, t in enumerate(inputs) if t in inputs[:i]), None)
    if twice is not None:
        raise Costlier(f"{where}: {twice.name} is concatenated twice, and stacking would compute it twice")


def _one_source(parts: list[branches.Branch], where: str) -> fx.Node | None:
    """The one tensor every part reads, or ``None`` (convs of different tensors: an Inception block's towers);
    refuses a part that reads it through a crop no padding composes with (REPARAM §10)."""
    sources = {p.input for p in parts}
    crops = [p for p in parts if p.unread_crop is not None and p.unread_crop.source in sources]
    if crops:
        raise NotExact(f"{where}: {crops[0].label} not stacked: {crops[0].unread_crop.why_not}")
    return next(iter(sources)) if len(sources) == 1 else None


@register_pass("concat_convs", "convs of one input concatenated on channels, as one conv (DBB's concatenation)")
def concat_convs(ctx: PassContext, node: fx.Node) -> bool:
    cat = ops.concat(node)
    if cat is None or len(cat[0]) < 2 or not all(isinstance(t, fx.Node) and len(t.users) == 1 for t in cat[0]):
        return False
    parts = [branches.as_branch(ctx.gm, t) for t in cat[0]]
    if any(p is None or not p.from_conv for p in parts):
        return False  # not convs: nothing to stack
    ndim = rank(node)
    if ndim is None or cat[1] % ndim != parts[0].spec.channel_dim(ndim):
        return False
    where = f"{ctx.label(node, 'concatenation')} of {len(parts)} convs"
    source = _one_source(parts, where)
    if source is None:
        return False
    if branches.why_reads_differ(source):
        raise NotExact(f"{where}: {branches.why_reads_differ(source)}")
    _read_once(list(cat[0]), where)
    merged, why = branches.stack(parts)
    if merged is None:
        raise NotExact(f"{where}: {why}")
    if min(merged.spec.padding) < 0:
        raise NotExact(f"{where}: the stacked conv would need padding {merged.spec.padding}")
    why = cost.why_costlier([p.cost() for p in parts], merged.cost())
    if why is not None:
        raise Costlier(f"{where}: {why}")
    first_read = min(source.users, key=position)
    emit(ctx.gm, merged.spec, merged.weight, merged.bias, input=source, replaces=node, storage=merged.storage,
         name=merged.name, at=first_read if position(first_read) < position(node) else node)
    return True
