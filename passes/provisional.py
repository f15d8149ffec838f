"""``settle_provisional``: compositions made in the expectation of a later fold, restored where it did not land.

``sequential`` composes a 1x1 -> kxk pair into one kxk conv, costlier than the pair, when a sum of the same
input holds a conv that would absorb it (DBB's 1x1-kxk branch). Where that sum does not fold after all
(peft DoRA scales its base term by a norm, a consumer reads the term alone), the composed conv would stay
and the result would cost more than its input. This pass runs last in each round (after ``cleanup``) and,
once a whole round has passed without any other rewrite (the graph is at its fixpoint), restores every
composition still standing as its two layers, marked so that it is not composed in that expectation again.
"""

from __future__ import annotations

from torch import fx

from fxreparam.graph import insert_layer, live_nodes, provisional, replace
from fxreparam.meta import drop_provisional, mark_speculation_undone
from fxreparam.registry import PassContext, register_pass

_SEEN = "_fxreparam_settle_fingerprint"


def _fingerprint(graph: fx.Graph) -> int:
    """A hash of the graph's nodes and what they call: equal between two rounds iff no pass rewrote anything."""
    return hash(tuple((n.name, str(n.target), *map(id, n.all_input_nodes)) for n in graph.nodes))


def restore(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace the provisional composition ``node`` by the two layers it was composed from."""
    record = provisional(node)
    first = insert_layer(gm, record.first.spec, record.first.weight, record.first.bias, input=record.input,
                         before=node, storage=record.first.storage, name=record.first.name, like=node)
    first.meta.clear()
    first.meta.update(record.first.meta)
    second = insert_layer(gm, record.second.spec, record.second.weight, record.second.bias, input=first,
                          before=node, storage=record.second.storage, name=record.second.name, like=node)
    second.meta.update(record.second.meta)
    mark_speculation_undone(second)
    for restored in (first, second):
        drop_provisional(restored)
    replace(node, second)


def undo_provisional(gm: fx.GraphModule) -> int:
    """Restore every provisional composition still standing in ``gm`` (callable after a fixpoint as well)."""
    standing = [n for n in live_nodes(gm.graph) if provisional(n) is not None]
    for node in standing:
        restore(gm, node)
    return len(standing)


@register_pass("settle_provisional", "restore compositions made for a sum that did not fold (never costlier than "
                                     "the input)")
def settle_provisional(ctx: PassContext) -> int:
    seen, now = ctx.gm.__dict__.get(_SEEN), _fingerprint(ctx.graph)
    ctx.gm.__dict__[_SEEN] = now
    return undo_provisional(ctx.gm) if seen == now else 0
