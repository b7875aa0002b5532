"""Top-k sparse GQA attention (the attention half of DSA): prefill/training with autograd, and paged decode.

    idx = keye.ops.indexer_topk_prefill(q8, q_scale, w, k8, k_scale, cu_seqlens, 2048)   # [T, 2048] positions
    o, lse = keye.ops.sparse_attention(q, k, v, idx, cu_seqlens)                         # q [T, 32, 128] ...
    o, lse = keye.ops.sparse_attention_decode(q, k_cache, v_cache, slots)                # paged KV, cache slots

The specification is keye/ops/reference/sparse_attention.py. On CUDA with bf16, D in {64, 128} and at most 16 query
heads per KV head, forward and backward run keye's kernels (csrc/sparse_attention/); other inputs run the
reference. The backward kernels add dQ/dK/dV with atomics: fp32 by default (fast; the summation order varies run
to run), or, with torch.use_deterministic_algorithms(True), int64 fixed point (bitwise reproducible: integer sums do
not depend on the order the atomics arrive in; see fixed_point_scales for the precision). Both are registered ops
(keye::sparse_attention, keye::sparse_attention_backward) with fake implementations, so the whole thing traces
under torch.compile. For inspection and tests, torch.ops.keye.sparse_attention_block_plan(indices, row_base,
num_rows) (CUDA only) returns the prefill kernels' block plan: per 16 adjacent queries the rows all of them selected,
and per query pair the rest (csrc/sparse_attention/block_plan.h).
"""

from __future__ import annotations

import functools
import math

import torch

from keye._extension import kernels_available
from keye.ops._dispatch import use_kernel
from keye.ops.reference import sparse_attention as ref

# Load the extension (its TORCH_LIBRARY(keye) block) before the Python ops below add to the keye namespace.
kernels_available()

MAX_KERNEL_SLOTS_PER_SPLIT = 2048  # index slots per query one CTA stages (csrc/sparse_attention, kMaxChunk)


def _kernel_ok(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (use_kernel(q, k) and q.dtype == torch.bfloat16 and q.shape[-1] in (64, 128)
            and q.shape[-2] // k.shape[-2] <= 16)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_splits(q: torch.Tensor, k: torch.Tensor, slots_per_query: int, pair_queries: bool = True) -> int:
    """CTAs per (query pair, KV head): as many as keep the grid within one CTA per SM (decode: few queries, long
    lists), never fewer than 64 slots per split, never more than 2048 (the kernel's shared-memory index buffer).
    Each split adds a partial-output write and a merge; measured on the H200 (decode, 128K context, 2048 slots,
    one call in a CUDA graph): batch 32 (128 CTAs per split) 51.7 us with 1 split, 55.1 with 2, 64.5 with 3 (the
    old rule, two CTAs per SM); batch 8: 24.7 us with 4 splits, 25.7 with 8; batch 128: 1 split best."""
    least = max(1, math.ceil(slots_per_query / MAX_KERNEL_SLOTS_PER_SPLIT))
    if not q.is_cuda:
        return least
    pair = 2 if pair_queries and q.shape[-2] // k.shape[-2] <= 8 else 1
    ctas = math.ceil(q.shape[0] / pair) * k.shape[1]
    want = max(1, _num_sms(q.device.index or 0) // max(1, ctas))
    return max(least, min(want, max(1, slots_per_query // 64)))


@torch.library.custom_op("keye::sparse_attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
               row_base: torch.Tensor | None, scale: float, splits: int,
               pair_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    if _kernel_ok(q, k):
        return torch.ops.keye.sparse_attention_fwd(q, k, v, indices, row_base, scale, splits, pair_queries)
    return ref.attend(q, k, v, _rows(indices, row_base), scale)


@_attention.register_fake
def _(q, k, v, indices, row_base, scale, splits, pair_queries=True):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("keye::sparse_attention_backward", mutates_args=())
def _attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                        row_base: torch.Tensor | None, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                        dlse: torch.Tensor, scale: float, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _kernel_ok(q, k):  # every other device / dtype: the chunked PyTorch formula
        return ref.attend_backward(q, k, v, _rows(indices, row_base), o, lse, do, scale, dlse=dlse)
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1) - dlse
    if not torch.are_deterministic_algorithms_enabled():  # fast mode: fp32 atomics
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        torch.ops.keye.sparse_attention_bwd(q, k, v, do, indices, row_base, lse, delta, scale, splits, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    fixed, unscale = fixed_point_scales(q, k, v, do, delta, scale, indices.shape[1])
    dq = torch.zeros(q.shape, dtype=torch.int64, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.int64, device=k.device)
    dv = torch.zeros_like(dk)
    torch.ops.keye.sparse_attention_bwd(q, k, v, do, indices, row_base, lse, delta, scale, splits, dq, dk, dv,
                                        True, fixed)
    return tuple((g.float() * unscale[i]).to(t.dtype) for i, (g, t) in enumerate(((dq, q), (dk, k), (dv, v))))


def fixed_point_scales(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, delta: torch.Tensor,
                       scale: float, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic backward's scales for dq, dk, dv: (2^s [3] fp32 for the kernel, 2^-s [3] fp32 to undo it).

    Every addend x of a gradient element is added as round(x * 2^s). s is chosen from a bound B on the sum of the
    absolute addends of any element, so that B * 2^s < 2^61 (a factor 2 spare for the rounding of P and dS to bf16
    before the key products, and no int64 sum can overflow). With G = Hq / Hkv, N queries, K index slots and P <= 1:
        |dS| <= scale * (D * max|dO| * max|v| + max|delta|)        (dP = dO . v)
        dV: at most N * G * K addends |P dO| <= max|dO| (K: a list may repeat a key);  dK: as many |dS q|;
        dQ: K addends |dS k|.
    Each addend's rounding costs at most 2^-s / 2 ~ B * 2^-62 absolute. At Keye's 32K training shape (N * G * K =
    2^29) that is about 2^-33 of max|dO| per addend for dV: far below the bf16 rounding of the returned gradients.
    Computed on the device (no host sync). Non-finite inputs, or a bound beyond what 2^-126 can scale, give NaN
    undo factors: the gradient comes out NaN rather than wrapped integers.
    """
    n, hq, d = q.shape
    group = hq // k.shape[1]

    def amax(t: torch.Tensor) -> torch.Tensor:
        return t.abs().amax().double() if t.numel() else torch.zeros((), dtype=torch.float64, device=t.device)

    ds = scale * (d * amax(do) * amax(v) + amax(delta))
    key_addends = n * group * max(slots, 1)
    bound = torch.stack([slots * ds * amax(k), key_addends * ds * amax(q), key_addends * amax(do)])
    exponent = 61 - (torch.floor(torch.log2(bound)) + 1)  # bound < 2^(61 - exponent); +inf for a zero bound
    ok = torch.isfinite(bound) & (exponent >= -126)
    exponent = exponent.clamp(-126, 126)
    return torch.exp2(exponent).float(), torch.where(ok, torch.exp2(-exponent), torch.nan).float()


@_attention_backward.register_fake
def _(q, k, v, indices, row_base, o, lse, do, dlse, scale, splits):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _rows(indices: torch.Tensor, row_base: torch.Tensor | None) -> torch.Tensor:
    return indices if row_base is None else torch.where(indices >= 0, indices + row_base[:, None], -1)


def _setup(ctx, inputs, output):
    q, k, v, indices, row_base, scale = inputs[:6]
    ctx.save_for_backward(q, k, v, indices, row_base, *output)
    ctx.scale = scale
    ctx.splits = max(1, math.ceil(indices.shape[1] / MAX_KERNEL_SLOTS_PER_SPLIT))


def _backward(ctx, do, dlse):
    q, k, v, indices, row_base, o, lse = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv = _attention_backward(q, k, v, indices, row_base, o, lse, do, dlse, ctx.scale, ctx.splits)
    return dq, dk, dv, None, None, None, None, None


_attention.register_autograd(_backward, setup_context=_setup)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     cu_seqlens: torch.Tensor, *, scale: float | None = None, packed: bool = False,
                     splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal top-k sparse attention over a packed batch (prefill and training; differentiable in q, k, v).

    q [T, Hq, D], k and v [T, Hkv, D] (Hq a multiple of Hkv; query head h reads KV head h // (Hq / Hkv));
    indices int32 [T, K]: for each query the keys it attends to, as positions within its own sequence (the default
    output of indexer_topk_prefill) or, with packed=True, as rows of the packed batch; -1 = empty slot; every
    index must be causal (checked while keye.ops.index_checks is on). cu_seqlens [B+1] int32/int64.
    scale defaults to D^-0.5. Returns o [T, Hq, D] (q's dtype) and lse [T, Hq] fp32 (natural-log softmax
    denominator; -inf with o = 0 for a query without keys). Gradients of o and lse flow to q, k and v.
    """
    ref.check_prefill_args(q, k, v, indices, cu_seqlens)
    starts = ref.sequence_starts(cu_seqlens, q.shape[0])
    ref.check_causal(indices, starts, packed)
    splits = default_splits(q, k, indices.shape[1]) if splits is None else splits
    if q.is_cuda and q.shape[0] > 0:
        splits = max(1, min(splits, max(1, indices.shape[1])))
    return _attention(q, k, v, indices, None if packed else starts, ref.default_scale(q, scale), splits)


def sparse_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, *,
                            scale: float | None = None, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode over a paged KV cache: q [B, n, Hq, D] (n new tokens per sequence), k_cache and v_cache
    [num_pages, page_size, Hkv, D] (any page size), slots int32 [B, n, K] (physical cache slots
    page * page_size + offset, e.g. indexer_topk_decode(..., physical=True); -1 = empty).

    Returns o [B, n, Hq, D] and lse [B, n, Hq]. Each query's slots are split across `splits` CTAs (default: enough
    to fill the GPU) and merged by log-sum-exp. No host synchronisation while index checks are off; capturable in a
    CUDA graph.
    """
    ref.check_decode_args(q, k_cache, v_cache, slots)
    B, n, Hq, D = q.shape
    k = k_cache.view(-1, *k_cache.shape[2:])
    v = v_cache.view(-1, *v_cache.shape[2:])
    qf = q.reshape(B * n, Hq, D)
    pair = n > 1  # consecutive rows share a CTA only when they are tokens of one sequence (n > 1)
    splits = default_splits(qf, k, slots.shape[-1], pair) if splits is None else splits
    o, lse = _attention(qf, k, v, slots.reshape(B * n, -1), None, ref.default_scale(q, scale), splits, pair)
    return o.view(B, n, Hq, D), lse.view(B, n, Hq)


__all__ = ["sparse_attention", "sparse_attention_decode", "default_splits"]
