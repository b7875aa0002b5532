"""Specification of the DSA lightning indexer and its top-k selection (Keye-VL-2.0: DSA on GQA).

Per token t the indexer has queries q[t] [H_I, D_I], raw per-head weights w[t] [H_I] (may be negative) and
one shared key k[t] [D_I]. Upstream (in the model) q gets RMSNorm, k LayerNorm, both M-RoPE; then
``indexer_rotate_quantize`` applies the orthonormal Hadamard rotation and FP8 quantisation:

* e4m3, one block per row of D_I values: one scale per (token, head) for q, one per token for k;
  scale = 2^ceil(log2(max(amax, 1e-4) / 448)) (ue8m0, a power of two rounded up), x8 = x / scale.

Score of query t against key s (same sequence, s <= t):

    I[t, s] = k_scale[s] * sum_h (w[t, h] * D_I^-0.5 * q_scale[t, h]) * ReLU(q8[t, h] . k8[s])

Selection keeps the min(topk, number of visible keys) highest scores of each query, ties going to the lower
key position (NaN counts as -inf, -0.0 as +0.0); the kept indices are written in ascending position order
(the order sparse attention reads them in), remaining slots are -1. ReLU makes exact ties common (rows of
0.0), so the tie rule is part of the result, not a detail.

Index conventions: ``positions`` are positions within the query's own sequence (0 = its first token);
``packed`` indices are rows of the packed batch (position + cu_seqlens[b]); decode can also return
physical cache slots (page * 64 + offset).

All score and selection functions work in query chunks so that no T x T matrix exists at once; the chunk
holds at most ``max_chunk_bytes`` of scores.
"""

from __future__ import annotations

import math

import torch

from keye.ops._checks import check_index_range, check_int_arg, check_same_device, check_size, check_tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PAGE_SIZE = 64
HEADS = (4, 8, 16, 32, 64)
HEAD_DIMS = (32, 64, 128)
MAX_TOPK = 4096
_CHUNK_BYTES = 256 << 20
OP = "dsa_indexer"


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform (Sylvester order, scale n^-0.5) over the last dim, in fp32."""
    n = x.shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"keye.hadamard_transform: last dim must be a power of two, got {n}")
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2).view(-1, n)
        h *= 2
    return (y * n ** -0.5).view(x.shape)


def quantize_fp8_ue8m0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) e4m3 quantisation with power-of-two scales rounded up: (x8, scale fp32)."""
    xf = x.float()
    amax = xf.abs().amax(-1).clamp_min(1e-4)
    # 2^ceil(log2(amax / 448)) exactly (log2 in fp32 can round x = 2^e * (1 + 2^-23) down to e): frexp gives
    # x = m * 2^e with m in [0.5, 1), so the answer is 2^(e-1) when m == 0.5 and 2^e otherwise.
    mant, expo = torch.frexp(amax / FP8_MAX)
    scale = torch.ldexp(torch.ones_like(amax), expo - (mant == 0.5).int())
    x8 = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, scale


def indexer_rotate_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hadamard rotation then FP8 ue8m0 quantisation: q [T, H_I, D_I] or k [T, D_I] -> (fp8, scales)."""
    check_tensor(x, "indexer_rotate_quantize", "x", (torch.bfloat16, torch.float16, torch.float32), x.dim(),
                 "[..., D_I]")
    if x.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"keye.indexer_rotate_quantize: D_I (x.size(-1)) must be one of {HEAD_DIMS}, "
                         f"got {x.shape[-1]}")
    return quantize_fp8_ue8m0(hadamard_transform(x))


def check_queries(q8, q_scale, w, op, layout) -> None:
    """q8 [..., H_I, D_I] fp8 with q_scale fp32 and w float of shape [..., H_I]."""
    check_tensor(q8, op, "q8", (FP8,), len(layout), "[" + ", ".join(layout) + "]")
    H, D = q8.shape[-2:]
    if H not in HEADS:
        raise ValueError(f"keye.{op}: H_I (q8.size({q8.dim() - 2})) must be one of {HEADS}, got {H}")
    if D not in HEAD_DIMS:
        raise ValueError(f"keye.{op}: D_I (q8.size({q8.dim() - 1})) must be one of {HEAD_DIMS}, got {D}")
    lead = layout[:-1]
    check_tensor(q_scale, op, "q_scale", (torch.float32,), len(lead), "[" + ", ".join(lead) + "]")
    check_tensor(w, op, "w", (torch.float32, torch.bfloat16, torch.float16), len(lead), "[" + ", ".join(lead) + "]")
    for name, t in (("q_scale", q_scale), ("w", w)):
        check_same_device(t, q8, op, name, "q8")
        if t.shape != q8.shape[:-1]:
            raise ValueError(f"keye.{op}: argument '{name}' must have shape {list(q8.shape[:-1])}, "
                             f"got {list(t.shape)}")


def check_keys(k8, k_scale, q8, op) -> None:
    """k8 [N, D_I] fp8 with k_scale [N] fp32, on q8's device, D_I matching q8's."""
    check_tensor(k8, op, "k8", (FP8,), 2, "[T, D_I]")
    check_same_device(k8, q8, op, "k8", "q8")
    if k8.shape[-1] != q8.shape[-1]:
        raise ValueError(f"keye.{op}: argument 'k8' has D_I = {k8.shape[-1]} but 'q8' has {q8.shape[-1]}")
    check_tensor(k_scale, op, "k_scale", (torch.float32,), 1, "[T]")
    check_same_device(k_scale, q8, op, "k_scale", "q8")
    check_size(k_scale, 0, k8.shape[0], op, "k_scale", "the key count (k8.size(0))")


def indexer_scores(q8, q_scale, w, k8, k_scale) -> torch.Tensor:
    """Unmasked scores [Tq, Tk] fp32 of queries against keys.

    The fp8 dot products are exact in float64 (every partial sum is a multiple of 2^-18 below 2^25), the
    heads are added in order in float64 and the result is rounded once to fp32, so a score does not depend
    on how the queries are chunked."""
    D = q8.shape[-1]
    dots = torch.einsum("thd,sd->ths", q8.double(), k8.double()).relu_()
    coef = w.double() * (D ** -0.5) * q_scale.double()
    acc = torch.zeros(dots.shape[0], dots.shape[2], dtype=torch.float64, device=dots.device)
    for h in range(dots.shape[1]):
        acc += coef[:, h: h + 1] * dots[:, h]
    return (acc * k_scale.double().unsqueeze(0)).float()


def select_topk(scores: torch.Tensor, visible: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row over its first visible[i] columns: (indices int32 [R, topk], scores fp32).

    The min(topk, visible) highest scores, ties to the lower column, NaN as -inf; returned in ascending column
    order, then -1 (score -inf) in the slots past the visible count."""
    R, L = scores.shape
    col = torch.arange(L, device=scores.device)
    masked = torch.where(scores.isnan(), float("-inf"), scores)
    masked = masked.masked_fill(col.unsqueeze(0) >= visible.unsqueeze(1), float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :topk]
    if order.shape[1] < topk:
        order = torch.cat([order, order.new_zeros(R, topk - order.shape[1])], 1)
    rank = torch.arange(topk, device=scores.device).unsqueeze(0)
    empty = rank >= visible.clamp(max=topk).unsqueeze(1)
    order = order.masked_fill(empty, L).sort(dim=1).values  # column order, empty slots last
    empty = order == L
    top = masked.gather(1, order.clamp(max=max(L - 1, 0))) if L else masked.new_zeros(R, topk)
    return order.masked_fill(empty, -1).int(), top.masked_fill(empty, float("-inf"))


def _rows_per_chunk(heads: int, keys: int, max_chunk_bytes: int) -> int:
    return max(1, max_chunk_bytes // max(1, 8 * (heads + 2) * keys))  # float64 dots per head + scores


def check_cu_seqlens(cu_seqlens, total, op=OP) -> list[int]:
    check_tensor(cu_seqlens, op, "cu_seqlens", (torch.int32, torch.int64), 1, "[num_seqs + 1]")
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"keye.{op}: 'cu_seqlens' must start at 0, never decrease and end at the token count "
                         f"{total}, got {bounds[:8]}{'...' if len(bounds) > 8 else ''}")
    return bounds


def check_prefill_args(q8, q_scale, w, k8, k_scale, cu_seqlens, topk, op="indexer_topk_prefill") -> list[int]:
    """Validates indexer_topk_prefill's arguments; returns the sequence bounds (cu_seqlens as a list)."""
    check_queries(q8, q_scale, w, op, ("T", "H_I", "D_I"))
    check_keys(k8, k_scale, q8, op)
    check_size(k8, 0, q8.shape[0], op, "k8", "the token count (q8.size(0))")
    check_int_arg(topk, 1, MAX_TOPK, op, "topk")
    return check_cu_seqlens(cu_seqlens, q8.shape[0], op)


def indexer_topk_prefill(q8, q_scale, w, k8, k_scale, cu_seqlens, topk: int, *, packed: bool = False,
                         return_scores: bool = False, max_chunk_bytes: int = _CHUNK_BYTES):
    """Causal top-k selection for a packed batch. q8 [T, H_I, D_I] fp8, q_scale [T, H_I] fp32, w [T, H_I],
    k8 [T, D_I] fp8, k_scale [T] fp32, cu_seqlens [B+1].

    Returns indices int32 [T, topk] (positions within each sequence, or packed rows when packed=True; -1 =
    empty) and, with return_scores, their scores fp32 [T, topk] (-inf for empty slots).
    """
    bounds = check_prefill_args(q8, q_scale, w, k8, k_scale, cu_seqlens, topk)
    T, H, _ = q8.shape
    indices = torch.full((T, topk), -1, dtype=torch.int32, device=q8.device)
    scores = torch.full((T, topk), float("-inf"), device=q8.device) if return_scores else None
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        step = _rows_per_chunk(H, s1 - s0, max_chunk_bytes)
        for a in range(s0, s1, step):
            b = min(a + step, s1)
            sc = indexer_scores(q8[a:b], q_scale[a:b], w[a:b], k8[s0:b], k_scale[s0:b])
            visible = torch.arange(a - s0 + 1, b - s0 + 1, device=q8.device)
            idx, top = select_topk(sc, visible, topk)
            indices[a:b] = torch.where(idx >= 0, idx + s0, idx) if packed else idx
            if scores is not None:
                scores[a:b] = top
    return (indices, scores) if return_scores else indices


def check_cache(k_cache, k_scale_cache, ref, ref_name, op) -> None:
    """k_cache [pages, 64, D_I] fp8 and k_scale_cache [pages, 64] fp32, D_I and device matching ref's."""
    D = ref.shape[-1]
    check_tensor(k_cache, op, "k_cache", (FP8,), 3, f"[num_pages, {PAGE_SIZE}, D_I]")
    check_same_device(k_cache, ref, op, "k_cache", ref_name)
    if k_cache.shape[1] != PAGE_SIZE or k_cache.shape[2] != D:
        raise ValueError(f"keye.{op}: 'k_cache' must have shape [num_pages, {PAGE_SIZE}, {D}], "
                         f"got {list(k_cache.shape)}")
    check_tensor(k_scale_cache, op, "k_scale_cache", (torch.float32,), 2, f"[num_pages, {PAGE_SIZE}]")
    check_same_device(k_scale_cache, ref, op, "k_scale_cache", ref_name)
    if k_scale_cache.shape != k_cache.shape[:2]:
        raise ValueError(f"keye.{op}: 'k_scale_cache' must have shape {list(k_cache.shape[:2])}, "
                         f"got {list(k_scale_cache.shape)}")


def indexer_cache_append(k8, k_scale, k_cache, k_scale_cache, slot_mapping) -> None:
    """Write new keys into the paged index-key cache in place: token i goes to slot slot_mapping[i]
    (= page * 64 + offset); slot -1 skips the token (padding)."""
    op = "indexer_cache_append"
    check_tensor(k8, op, "k8", (FP8,), 2, "[N, D_I]")
    check_cache(k_cache, k_scale_cache, k8, "k8", op)
    check_tensor(k_scale, op, "k_scale", (torch.float32,), 1, "[N]")
    check_tensor(slot_mapping, op, "slot_mapping", (torch.int32, torch.int64), 1, "[N]")
    for name, t in (("k_scale", k_scale), ("slot_mapping", slot_mapping)):
        check_size(t, 0, k8.shape[0], op, name, "the token count (k8.size(0))")
    check_index_range(slot_mapping, -1, k_cache.shape[0] * PAGE_SIZE - 1, op, "slot_mapping")
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(torch.uint8).view(-1, k8.shape[1])[slots] = k8[keep].view(torch.uint8)
    k_scale_cache.view(-1)[slots] = k_scale[keep]


def check_decode_args(q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens, topk,
                      op="indexer_topk_decode", ranges: bool = True) -> None:
    """Validates indexer_topk_decode's arguments; ranges=False leaves the value-range checks (host syncs) to
    the caller (the CUDA path, whose kernel op checks them)."""
    check_queries(q8, q_scale, w, op, ("B", "n", "H_I", "D_I"))
    B, n = q8.shape[:2]
    check_cache(k_cache, k_scale_cache, q8, "q8", op)
    check_tensor(block_table, op, "block_table", (torch.int32,), 2, "[B, max_pages]")
    check_tensor(seq_lens, op, "seq_lens", (torch.int32, torch.int64), 1, "[B]")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        check_same_device(t, q8, op, name, "q8")
        check_size(t, 0, B, op, name, "the batch (q8.size(0))")
    check_int_arg(topk, 1, MAX_TOPK, op, "topk")
    if not ranges:
        return
    check_index_range(seq_lens, n, block_table.shape[1] * PAGE_SIZE, op, "seq_lens")
    check_index_range(block_table, 0, k_cache.shape[0] - 1, op, "block_table")


def indexer_topk_decode(q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens, topk: int, *,
                        physical: bool = False, return_scores: bool = False):
    """Selection for a few new queries per sequence against the paged cache (decode, chunked or speculative).

    q8 [B, n, H_I, D_I] fp8, q_scale and w [B, n, H_I]; sequence b holds seq_lens[b] tokens in the cache
    (the n new ones last: query j sits at position seq_lens[b] - n + j and sees positions up to its own);
    block_table [B, max_pages] int32 maps page p of sequence b to a cache page.
    Returns indices int32 [B, n, topk]: positions within the sequence, or cache slots (page * 64 + offset)
    with physical=True; -1 = empty. With return_scores also the scores fp32 [B, n, topk].
    """
    check_decode_args(q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens, topk)
    B, n, H, D = q8.shape
    out = torch.full((B, n, topk), -1, dtype=torch.int32, device=q8.device)
    scores = torch.full((B, n, topk), float("-inf"), device=q8.device) if return_scores else None
    for b, L in enumerate(seq_lens.tolist()):
        pages = block_table[b, : math.ceil(L / PAGE_SIZE)].long()
        keys = k_cache.view(torch.uint8)[pages].view(FP8).reshape(-1, D)[:L]
        kscale = k_scale_cache[pages].reshape(-1)[:L]
        sc = indexer_scores(q8[b], q_scale[b], w[b], keys, kscale)
        visible = torch.arange(L - n + 1, L + 1, device=q8.device)
        idx, top = select_topk(sc, visible, topk)
        out[b] = idx
        if scores is not None:
            scores[b] = top
    if physical:
        out = paged_slots(out, block_table)
    return (out, scores) if return_scores else out


def paged_slots(positions: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Positions within each sequence [B, ...] int32 -> cache slots block_table[b, p // 64] * 64 + p % 64 (-1 stays
    -1; a position past the table becomes -1)."""
    B = block_table.shape[0]
    pos = positions.reshape(B, -1).long()
    page = pos.clamp(min=0) // PAGE_SIZE
    inside = (pos >= 0) & (page < block_table.shape[1])
    slot = block_table.long().gather(1, page.clamp(max=block_table.shape[1] - 1)) * PAGE_SIZE + pos % PAGE_SIZE
    return torch.where(inside, slot, -1).int().view(positions.shape)
