"""``inference_identities``: ops that are the identity at inference (dropout in eval mode, ``nn.Identity``) removed.

A dropout between a conv and a layer-scale multiply, or between a BatchNorm1d and a Linear, is
the identity in eval mode but blocks every fold across it. Every capture form keeps it: a module
call, ``F.dropout2d``/``F.feature_alpha_dropout``, or ``aten.dropout``/``feature_dropout``/
``alpha_dropout``/``feature_alpha_dropout`` with ``train=False`` under ``torch.export``; this pass removes it.
"""

from __future__ import annotations

from torch import fx

from fxreparam import ops
from fxreparam.registry import PassContext, register_pass


@register_pass("inference_identities", "remove ops that are the identity at inference (dropout in eval, "
                                       "nn.Identity)")
def inference_identities(ctx: PassContext, node: fx.Node) -> bool:
    source = ops.inference_identity(ctx.gm, node)
    if source is None:
        return False
    node.replace_all_uses_with(source)
    ctx.gm.graph.erase_node(node)  # dropout is seeded-random, so dead-code elimination keeps it: it is the identity
    return True
