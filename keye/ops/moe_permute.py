"""MoE token permutation: public ops, dispatch, and their torch.library registrations.

    routing = keye.ops.moe_route(topk_ids, num_experts=128, align=8)
    xs = keye.ops.moe_permute(x, routing.dest, routing.src)          # [rows, H], grouped by expert
    ... grouped GEMMs over routing.offsets ...
    out = keye.ops.moe_unpermute(ys, routing.dest, topk_weights)     # [T, H]

Semantics: keye/ops/reference/moe_permute.py. Differentiable in x/scale (permute) and y/weights
(unpermute); each op's backward is the other op (called through torch.ops.keye, so it stays traceable
and runs the same implementation as the forward).
"""

from __future__ import annotations

import torch

from keye._extension import kernels_available
from keye.ops import reference as ref
from keye.ops._dispatch import use_kernel
from keye.ops.reference.moe_permute import MoeRouting, num_permuted_rows


def moe_route(topk_ids: torch.Tensor, num_experts: int, align: int = 1) -> MoeRouting:
    """Group routed slots by expert: returns (dest [T,K], src [T*K+E*(align-1)], offsets [E+1]), int32.

    topk_ids: [T, K] int32/int64 expert ids in [0, num_experts), or -1 for a slot that is not routed.
    align: pad every expert's segment to a multiple of this many rows (tile size of the grouped GEMM).
    Deterministic: within an expert, rows follow the flat slot index t*K + k. No host sync (except the
    optional index checks, see keye.ops.index_checks).
    """
    if use_kernel(topk_ids):
        return MoeRouting(*torch.ops.keye.moe_route(topk_ids, num_experts, align))
    return ref.moe_route(topk_ids, num_experts, align)


def moe_permute(x: torch.Tensor, dest: torch.Tensor, src: torch.Tensor,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """Copy token rows into expert order: out[dest[t,k]] = scale[t,k] * x[t]; unused rows are zero.

    x: [T, H] bf16/fp16/fp32 (rows may be strided, unit stride in H); dest, src from moe_route;
    scale: optional [T, K] float factors (product in fp32). Returns [src.numel(), H] in x's dtype.
    """
    if use_kernel(x, dest, src, scale):
        return torch.ops.keye.moe_permute(x, dest, src, scale)
    return ref.moe_permute(x, dest, src, scale)


def moe_unpermute(y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Combine expert outputs per token: out[t] = sum_k weights[t,k] * y[dest[t,k]] (fp32 sum, k order).

    y: [rows, H] bf16/fp16/fp32; dest from moe_route; weights: optional [T, K] float (routing weights).
    Slots with dest == -1 add nothing. Returns [T, H] in y's dtype.
    """
    if use_kernel(y, dest, weights):
        return torch.ops.keye.moe_unpermute(y, dest, weights)
    return ref.moe_unpermute(y, dest, weights)


def src_from_dest(dest: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Inverse map of dest: src[r] = t*K + k for r = dest[t,k], -1 for rows no slot targets."""
    flat = dest.reshape(-1).long()
    # Unrouted slots scatter into a spare last row that is dropped.
    target = torch.where(flat >= 0, flat, num_rows)
    src = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=dest.device)
    src.scatter_(0, target, torch.arange(flat.numel(), dtype=torch.int32, device=dest.device))
    return src[:num_rows]


def moe_slot_dot(rows: torch.Tensor, dest: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-slot dot products: out[t,k] = <rows[dest[t,k]], tokens[t]> in fp32, 0 where dest == -1. [T, K] fp32.

    The gradient of a per-slot factor: routing weights (rows = expert outputs, tokens = output gradient) or
    permute scales. rows [R, H] and tokens [T, H] of one float dtype; dest from moe_route. Deterministic (fixed
    reduction order). Not differentiable (it is itself a gradient).
    """
    if use_kernel(rows, dest, tokens):
        return torch.ops.keye.moe_slot_dot(rows, dest, tokens)
    return ref.moe_slot_dot(rows, dest, tokens)


# --- torch.library registrations (only when the extension defined the ops) -------------------------

def _permute_setup(ctx, inputs, output):
    x, dest, src, scale = inputs
    ctx.save_for_backward(x if scale is not None and ctx.needs_input_grad[3] else None, dest, scale)


def _permute_backward(ctx, grad):
    x, dest, scale = ctx.saved_tensors
    grad = grad.contiguous()  # autograd hands over expanded (stride-0) gradients, e.g. from .sum()
    grad_x = torch.ops.keye.moe_unpermute(grad, dest, scale) if ctx.needs_input_grad[0] else None
    grad_scale = torch.ops.keye.moe_slot_dot(grad, dest, x).to(scale.dtype) if x is not None else None
    return grad_x, None, None, grad_scale


def _unpermute_setup(ctx, inputs, output):
    y, dest, weights = inputs
    ctx.num_rows = y.shape[0]
    ctx.save_for_backward(y if weights is not None and ctx.needs_input_grad[2] else None, dest, weights)


def _unpermute_backward(ctx, grad):
    y, dest, weights = ctx.saved_tensors
    grad = grad.contiguous()
    grad_y = None
    if ctx.needs_input_grad[0]:
        grad_y = torch.ops.keye.moe_permute(grad, dest, src_from_dest(dest, ctx.num_rows), weights)
    grad_w = torch.ops.keye.moe_slot_dot(y, dest, grad).to(weights.dtype) if y is not None else None
    return grad_y, None, grad_w


def _register() -> None:
    lib = "keye::"

    @torch.library.register_fake(lib + "moe_route")
    def _(topk_ids, num_experts, align=1):
        n = topk_ids.numel()
        return (topk_ids.new_empty(topk_ids.shape, dtype=torch.int32),
                topk_ids.new_empty(num_permuted_rows(n, num_experts, align), dtype=torch.int32),
                topk_ids.new_empty(num_experts + 1, dtype=torch.int32))

    @torch.library.register_fake(lib + "moe_permute")
    def _(x, dest, src, scale=None):
        return x.new_empty(src.shape[0], x.shape[1])

    @torch.library.register_fake(lib + "moe_unpermute")
    def _(y, dest, weights=None):
        return y.new_empty(dest.shape[0], y.shape[1])

    @torch.library.register_fake(lib + "moe_slot_dot")
    def _(rows, dest, tokens):
        return rows.new_empty(dest.shape, dtype=torch.float32)

    # The references are the CPU implementations, so torch.ops.keye.* work on any device.
    torch.library.impl(lib + "moe_route", "CPU")(lambda ids, e, align=1: tuple(ref.moe_route(ids, e, align)))
    torch.library.impl(lib + "moe_permute", "CPU")(ref.moe_permute)
    torch.library.impl(lib + "moe_unpermute", "CPU")(ref.moe_unpermute)
    torch.library.impl(lib + "moe_slot_dot", "CPU")(ref.moe_slot_dot)

    torch.library.register_autograd(lib + "moe_permute", _permute_backward, setup_context=_permute_setup)
    torch.library.register_autograd(lib + "moe_unpermute", _unpermute_backward, setup_context=_unpermute_setup)


if kernels_available():
    _register()
