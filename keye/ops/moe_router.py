"""MoE router op: fused softmax, top-k and renormalisation, plus load-balancing statistics.

    r = keye.ops.moe_router(logits, top_k=8)          # weights, ids, counts, prob_sum
    aux = keye.ops.load_balancing_loss(r.counts, r.prob_sum, logits.shape[0])

Semantics: keye/ops/reference/moe_router.py. Deterministic (fixed-order sums, integer counts).
"""

from __future__ import annotations

import torch

from keye._extension import kernels_available
from keye.ops import reference as ref
from keye.ops._dispatch import use_kernel
from keye.ops.reference.moe_router import MoeRouterOutput, load_balancing_loss


def moe_router(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> MoeRouterOutput:
    """Route each token to its top_k experts. logits: [T, E] bf16/fp16/fp32 (E <= 512, top_k <= 32).

    Returns (weights [T,K] fp32, ids [T,K] int32, counts [E] int32, prob_sum [E] fp32); weights and prob_sum
    are differentiable in logits.
    """
    if use_kernel(logits):
        return MoeRouterOutput(*torch.ops.keye.moe_router(logits, top_k, renormalize))
    return ref.moe_router(logits, top_k, renormalize)


def router_logits_grad(logits, ids, weights, renormalize, grad_weights, grad_prob_sum):
    """d(loss)/d(logits) for the router outputs, recomputing the softmax in fp32 (no [T, E] saved)."""
    p = torch.softmax(logits.float(), dim=-1)
    grad = torch.zeros_like(p)
    if grad_weights is not None:
        g = grad_weights.float()
        ids_l = ids.long()
        if renormalize:  # weights = softmax over the selected logits only
            grad.scatter_add_(1, ids_l, weights * (g - (weights * g).sum(-1, keepdim=True)))
        else:  # weights = full-softmax probabilities at ids
            grad.scatter_add_(1, ids_l, weights * g)
            grad -= p * (weights * g).sum(-1, keepdim=True)
    if grad_prob_sum is not None:
        gp = grad_prob_sum.float().unsqueeze(0)
        grad += p * (gp - (p * gp).sum(-1, keepdim=True))
    return grad.to(logits.dtype)


def _setup(ctx, inputs, output):
    logits, top_k, renormalize = inputs
    weights, ids, _, _ = output
    ctx.renormalize = renormalize
    ctx.save_for_backward(logits, ids, weights)


def _backward(ctx, grad_weights, grad_ids, grad_counts, grad_prob_sum):
    logits, ids, weights = ctx.saved_tensors
    return router_logits_grad(logits, ids, weights, ctx.renormalize, grad_weights, grad_prob_sum), None, None


def _register() -> None:
    name = "keye::moe_router"

    @torch.library.register_fake(name)
    def _(logits, top_k, renormalize=True):
        T, E = logits.shape
        return (logits.new_empty(T, top_k, dtype=torch.float32), logits.new_empty(T, top_k, dtype=torch.int32),
                logits.new_empty(E, dtype=torch.int32), logits.new_empty(E, dtype=torch.float32))

    torch.library.impl(name, "CPU")(lambda logits, k, renorm=True: tuple(ref.moe_router(logits, k, renorm)))
    torch.library.register_autograd(name, _backward, setup_context=_setup)


if kernels_available():
    _register()

__all__ = ["moe_router", "load_balancing_loss", "MoeRouterOutput", "router_logits_grad"]
