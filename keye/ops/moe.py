"""The routed experts of an MoE block as one differentiable op: router output in, combined hidden states out.

    r = keye.ops.moe_router(router_logits, top_k=8)
    out = keye.ops.moe(x, r.weights, r.ids, gate_up, down)

Specification: keye/ops/reference/moe.py (a loop over experts in fp32). On CUDA with bf16 on Hopper it runs
keye's kernels end to end, with no host synchronisation (CUDA-graph capturable with index checks off):

    moe_route -> moe_permute -> grouped GEMM gate_up -> SwiGLU -> grouped GEMM down -> moe_unpermute (weighted)

(with gate_up in moe_pack_gate_up's order, for inference: the gate_up GEMM's epilogue applies SwiGLU and h is never
written),

and for decode-size batches (at most one row per expert on average, no gradient needed) kernels that take the router's
output directly and stream each routed expert's weights once, with no routing, permutation or combine kernels: for
one token with at least 100 MB of routed weights, one kernel does it all (moe_decode: gate_up, SwiGLU, down and the
weighted combine; it streams faster but starts slower); otherwise (top_k * I <= 16384) two: gather + gate_up +
SwiGLU, then down + the combine. The backward is deterministic: data gradients
by grouped GEMMs against the transposed weights, weight gradients by K-grouped GEMMs (one CTA per output tile),
routing-weight gradients by per-slot dot products; no atomics anywhere.
"""

from __future__ import annotations

import functools

import torch

from keye.ops import reference as ref
from keye.ops._dispatch import use_kernel
from keye.ops.reference.moe import check_experts_args
from keye.ops.reference.moe_gemm import (
    DECODE_MAX_ACTIVATIONS, _check_gate_up_weights, decode_fused_preferred, moe_unpack_gate_up,
)

# Where the decode kernels replace the grouped GEMMs (no gradients): while the routed slots (T * top_k) are at most
# half the experts and the gate_up GEMM would have at most 3 waves of 256-column tiles over the SMs (one tile row per
# routed expert: fewer tiles leave SMs idle or each on a long K loop). H200, per layer in CUDA graphs (NOTES.md,
# twenty-sixth session), decode kernels / grouped GEMMs, us:
#   Keye 2048/768/128 (6 tiles per slot):   T = 4 89.6 / 112.8, T = 8 156.4 / 161.8, T = 10 182.6 / 178.8,
#                                           T = 12 214.7 / 199.6, T = 16 274.7 / 232.2
#   2048/1408/64 (11 tiles per slot):        T = 2 93.0 / 106.5, T = 4 147.1 / 149.9, T = 6 187.8 / 186.3,
#                                           T = 8 251.8 / 223.1
#   7168/2048/256 (16 tiles per slot):       T = 1 198.3 / 228.6, T = 2 415.4 / 429.6, T = 4 776.8 / 757.9,
#                                           T = 8 1358 / 1239
DECODE_MAX_ROWS_PER_EXPERT = 0.5
DECODE_MAX_TILE_WAVES = 3
DECODE_TILE_COLUMNS = 256


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device_index: int) -> bool:  # cached: the query costs ~6 us of host time per call on the H200
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(x: torch.Tensor) -> int:
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


def decode_preferred(slots: int, experts: int, inter: int, sms: int) -> bool:
    """Whether keye.ops.moe runs `slots` routed (token, expert) pairs without gradients on the decode kernels rather
    than the grouped GEMMs (see the measurements above)."""
    tiles = slots * -(-2 * inter // DECODE_TILE_COLUMNS)
    return slots <= DECODE_MAX_ROWS_PER_EXPERT * experts and tiles <= DECODE_MAX_TILE_WAVES * sms


def _fast_path_ok(x, gate_up, down) -> bool:
    return (use_kernel(x, gate_up, down)
            and x.dtype == gate_up.dtype == down.dtype == torch.bfloat16
            and _hopper_or_newer(_device_index(x)))


def moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
        down: torch.Tensor, *, gate_up_packed: bool = False) -> torch.Tensor:
    """x [T, H], weights/ids [T, K] (ids -1 = not routed), gate_up [E, H, 2I], down [E, I, H] -> [T, H].

    Differentiable in x, weights, gate_up and down. gate_up_packed: gate_up is in keye.ops.moe_pack_gate_up's
    column order (I a multiple of 128), for inference (no gradients): the gate_up GEMM applies SwiGLU in its
    epilogue and never writes h (the Keye layer forward at 16K tokens ~5% faster; NOTES.md), and the decode kernels
    read the packed order.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, gate_up, down))
    if gate_up_packed:
        if needs_grad:
            raise ValueError("keye.moe: gate_up_packed=True is for inference (no autograd formula); pass gate_up in "
                             "the checkpoint's order (keye.ops.moe_unpack_gate_up; a model: KeyeVL.unpack_experts()) "
                             "to train")
        _check_gate_up_weights(gate_up, "moe", "gate_up")
    if not _fast_path_ok(x, gate_up, down):
        return ref.moe(x, weights, ids, moe_unpack_gate_up(gate_up) if gate_up_packed else gate_up, down)
    check_experts_args(x, weights, ids, gate_up, down)
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    if not needs_grad and decode_preferred(ids.numel(), gate_up.shape[0], down.shape[1], _sm_count(_device_index(x))):
        fused = decode_fused_preferred(ids.shape[0], ids.shape[1], x.shape[1], down.shape[1])
        if fused or ids.shape[1] * down.shape[1] <= DECODE_MAX_ACTIVATIONS:
            return _decode(x, weights, ids, gate_up, down, fused, gate_up_packed)
    if gate_up_packed:
        return _forward_packed(x, weights, ids, gate_up, down)
    if not needs_grad:  # no autograd bookkeeping (host time before the first kernel: the GPU waits for it)
        return _forward(x, weights, ids, gate_up, down)[0]
    return _MoeLayer.apply(x, weights, ids, gate_up, down)


def _decode(x, weights, ids, gate_up, down, fused: bool, packed: bool):
    keye = torch.ops.keye
    ids, weights = ids.to(torch.int32).contiguous(), weights.to(torch.float32).contiguous()  # no-ops for the router's
    if fused:
        return keye.moe_decode(x, ids, weights, gate_up, down, packed)
    return keye.moe_decode_down(keye.moe_decode_gate_up(x, ids, gate_up, packed), ids, weights, down)


def _forward_packed(x, weights, ids, packed, down):
    """Inference over packed gate_up: route -> permute -> gate_up GEMM with SwiGLU in its epilogue -> down ->
    weighted combine."""
    keye = torch.ops.keye
    dest, src, offsets = keye.moe_route(ids, packed.shape[0], 1)
    a = keye.moe_grouped_mm_swiglu(keye.moe_permute(x, dest, src, None), packed, offsets, -1)
    return keye.moe_unpermute(keye.moe_grouped_mm(a, down, offsets, False, -1), dest, weights)


def _forward(x, weights, ids, gate_up, down):
    """out and what the backward needs: route -> permute -> gate_up -> SwiGLU -> down -> weighted combine."""
    keye = torch.ops.keye
    dest, src, offsets = keye.moe_route(ids, gate_up.shape[0], 1)
    xs = keye.moe_permute(x, dest, src, None)
    h = keye.moe_grouped_mm(xs, gate_up, offsets, False, -1)
    y = keye.moe_grouped_mm(keye.moe_swiglu(h), down, offsets, False, -1)
    return keye.moe_unpermute(y, dest, weights), dest, src, offsets, h, y


class _MoeLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, ids, gate_up, down):
        out, dest, src, offsets, h, y = _forward(x, weights, ids, gate_up, down)
        # xs and the SwiGLU output are recomputed in backward (cheap) instead of kept; h and y are kept.
        ctx.save_for_backward(x, weights, dest, src, offsets, h, y, gate_up, down)
        return out

    @staticmethod
    def backward(ctx, d_out):
        keye = torch.ops.keye
        x, weights, dest, src, offsets, h, y, gate_up, down = ctx.saved_tensors
        d_out = d_out.contiguous()
        d_weights = keye.moe_slot_dot(y, dest, d_out).to(weights.dtype) if ctx.needs_input_grad[1] else None
        dy = keye.moe_permute(d_out, dest, src, weights)              # rows: weights[t, k] * d_out[t]
        # The SwiGLU backward also recomputes the SwiGLU output a (for the down weights' gradient) in its pass over h.
        a = h.new_empty(h.shape[0], h.shape[1] // 2) if ctx.needs_input_grad[4] else None
        dh = keye.moe_swiglu_backward(h, keye.moe_grouped_mm(dy, down, offsets, True, -1), a)
        d_down = keye.moe_grouped_mm_wgrad(a, dy, offsets, -1) if ctx.needs_input_grad[4] else None
        d_gate_up = None
        if ctx.needs_input_grad[3]:
            d_gate_up = keye.moe_grouped_mm_wgrad(keye.moe_permute(x, dest, src, None), dh, offsets, -1)
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = keye.moe_unpermute(keye.moe_grouped_mm(dh, gate_up, offsets, True, -1), dest, None)
        return d_x, d_weights, None, d_gate_up, d_down
