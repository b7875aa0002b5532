"""Top-k sparse GQA attention (DSA): the specification, in chunked fp32 PyTorch.

Query row n (all Hq heads) attends over its own list of K/V rows, shared by its heads; query head h reads KV head
h // (Hq / Hkv):

    o[n, h] = sum_j softmax_j(scale * q[n, h] . k[r_j, h_kv]) v[r_j, h_kv],   r_j = rows of n's valid slots
    lse[n, h] = log sum_j exp(scale * q[n, h] . k[r_j, h_kv])               (natural log; -inf, o = 0 if no slot)

A slot that is -1 (or, with index checks off, out of range) is empty; a row listed twice counts twice. Prefill
indices are positions within each query's own sequence (what keye.ops.indexer_topk_prefill returns) and must be
causal (-1 or 0 <= index <= the query's position); decode indices are physical slots of a paged KV cache.
"""

from __future__ import annotations

import torch

from keye.ops._checks import _capturing, _fail, check_int_arg, check_same_device, check_size, check_tensor
from keye.ops import _checks

OP = "sparse_attention"
DECODE_OP = "sparse_attention_decode"
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
MAX_TOPK = 1 << 16
_CHUNK_BYTES = 256 << 20  # fp32 gather buffer per query chunk


def check_qkv(q, k, v, op: str, q_layout: str, kv_layout: str) -> None:
    check_tensor(q, op, "q", FLOAT_DTYPES, len(q_layout.split(",")), q_layout)
    for name, t in (("k", k), ("v", v)):
        check_tensor(t, op, name, (q.dtype,), len(kv_layout.split(",")), kv_layout)
        check_same_device(t, q, op, name, "q")
    if k.shape != v.shape:
        _fail(op, f"'k' and 'v' must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    hq, d = q.shape[-2:]
    hkv, dk = k.shape[-2:]
    if dk != d:
        _fail(op, f"'k' has head dim {dk} but 'q' has {d}")
    if hkv < 1 or hq % hkv:
        _fail(op, f"query heads ({hq}) must be a multiple of the KV heads ({hkv})")


def check_indices(indices, rows: int, op: str, layout: str, dim: int) -> None:
    check_tensor(indices, op, "indices", (torch.int32,), dim, layout)
    check_size(indices, 0, rows, op, "indices", "the query count (q.size(0))")
    check_int_arg(indices.shape[-1], 0, MAX_TOPK, op, "indices.size(-1)")


def check_cu_seqlens(cu_seqlens, total: int, ref: torch.Tensor, op: str = OP) -> None:
    """cu_seqlens [B+1] int32/int64 on q's device: starts at 0, never decreases, ends at `total` (checked with a
    host sync only while index checks are on)."""
    check_tensor(cu_seqlens, op, "cu_seqlens", (torch.int32, torch.int64), 1, "[num_seqs + 1]")
    check_same_device(cu_seqlens, ref, op, "cu_seqlens", "q")
    if cu_seqlens.numel() < 1:
        _fail(op, "'cu_seqlens' must hold at least one value (0)")
    if not _checks._index_checks or _capturing(cu_seqlens):
        return
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        _fail(op, f"'cu_seqlens' must start at 0, never decrease and end at the token count {total}, got "
                  f"{bounds[:8]}{'...' if len(bounds) > 8 else ''}")


def sequence_starts(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int32 [total]: the packed row where each token's sequence starts (no host sync)."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(cu[:-1], lengths, output_size=total).to(torch.int32)


def check_causal(indices: torch.Tensor, starts: torch.Tensor, packed: bool, op: str = OP) -> None:
    """Every slot is -1 or a causal key of its own query's sequence (host sync; follows keye.ops.index_checks)."""
    if not _checks._index_checks or indices.numel() == 0 or _capturing(indices):
        return
    own = torch.arange(indices.shape[0], device=indices.device, dtype=torch.int64)
    lo = starts.to(torch.int64) if packed else torch.zeros_like(own)
    hi = own if packed else own - starts.to(torch.int64)
    x = indices.to(torch.int64)
    bad = (x != -1) & ((x < lo[:, None]) | (x > hi[:, None]))
    if bool(bad.any()):
        n, j = (int(i) for i in bad.nonzero()[0])
        what = "packed rows of the query's own sequence" if packed else "positions within the query's sequence"
        _fail(op, f"argument 'indices' must hold -1 or causal {what} (in [{int(lo[n])}, {int(hi[n])}] for query "
                  f"{n}), found {int(x[n, j])} at [{n}, {j}] (index checks can be disabled with "
                  "keye.ops.index_checks(False) once inputs are trusted)")


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _rows_per_chunk(k: torch.Tensor, slots: int, chunk_bytes: int) -> int:
    per_query = max(1, slots * k.shape[1] * k.shape[2] * 4 * 2)
    return max(1, chunk_bytes // per_query)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The math dtype: fp32, or fp64 for fp64 inputs (the gradient tests' reference)."""
    return t.double() if t.dtype == torch.float64 else t.float()


def _gather(k: torch.Tensor, rows: torch.Tensor):
    """rows [C, K] -> (valid [C, K], k[rows] in the math dtype [C, K, Hkv, D], zero for empty slots)."""
    valid = (rows >= 0) & (rows < k.shape[0])
    kg = _acc(k[torch.where(valid, rows, 0).long()])
    return valid, kg * valid[:, :, None, None]


def _scores(q, kg, valid, scale):
    """q [C, Hq, D] -> s [C, Hkv, G, K] fp32 with empty slots at -inf."""
    C, Hq, D = q.shape
    Hkv = kg.shape[2]
    s = torch.einsum("cgid,cjgd->cgij", _acc(q).view(C, Hkv, Hq // Hkv, D), kg) * scale
    return s.masked_fill(~valid[:, None, None, :], float("-inf"))


def attend(q, k, v, rows, scale: float, chunk_bytes: int = _CHUNK_BYTES):
    """The core: q [N, Hq, D], k/v [S, Hkv, D], rows [N, K] (rows of k/v; <0 or >=S = empty) -> o [N, Hq, D]
    (q's dtype), lse [N, Hq] fp32. Differentiable by autograd (the tests' gradient reference)."""
    N, Hq, D = q.shape
    step = _rows_per_chunk(k, rows.shape[1], chunk_bytes)
    outs, lses = [], []
    for a in range(0, N, step):
        b = min(a + step, N)
        valid, kg = _gather(k, rows[a:b])
        _, vg = _gather(v, rows[a:b])
        s = _scores(q[a:b], kg, valid, scale)
        lse = torch.logsumexp(s, dim=-1)  # -inf for a query without a valid slot
        p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
        o = torch.einsum("cgij,cjgd->cgid", p, vg)
        outs.append(o.reshape(b - a, Hq, D))
        lses.append(lse.reshape(b - a, Hq))
    if not outs:
        return q.new_empty(q.shape), q.new_empty(N, Hq, dtype=torch.float32)
    return torch.cat(outs).to(q.dtype), torch.cat(lses)


def attend_backward(q, k, v, rows, o, lse, do, scale: float, dlse=None, chunk_bytes: int = _CHUNK_BYTES):
    """Gradients of attend given do (and optionally dlse): (dq, dk, dv) in the inputs' dtypes, computed in fp32
    chunk by chunk from the saved lse (no stored probabilities). With z = scale q.k, dz = p (do.v - do.o + dlse).
    dk/dv accumulate with index_put_(accumulate=True), deterministic when torch.use_deterministic_algorithms(True)
    is on."""
    N, Hq, D = q.shape
    S, Hkv, _ = k.shape
    G = Hq // Hkv
    dq = torch.empty_like(q)
    dk = torch.zeros(S + 1, Hkv, D, dtype=_acc(k[:0]).dtype, device=k.device)  # row S collects empty slots
    dv = torch.zeros_like(dk)
    step = _rows_per_chunk(k, rows.shape[1], chunk_bytes)
    for a in range(0, N, step):
        b = min(a + step, N)
        C = b - a
        valid, kg = _gather(k, rows[a:b])
        _, vg = _gather(v, rows[a:b])
        s = _scores(q[a:b], kg, valid, scale)
        l = lse[a:b].view(C, Hkv, G)
        p = torch.exp(s - l.masked_fill(torch.isinf(l), 0)[..., None])  # [C, Hkv, G, K]
        dout = _acc(do[a:b]).view(C, Hkv, G, D)
        delta = (dout * _acc(o[a:b]).view(C, Hkv, G, D)).sum(-1)  # [C, Hkv, G]
        if dlse is not None:
            delta = delta - _acc(dlse[a:b]).view(C, Hkv, G)
        dp = torch.einsum("cgid,cjgd->cgij", dout, vg)
        ds = p * (dp - delta[..., None]) * scale
        dq[a:b] = torch.einsum("cgij,cjgd->cgid", ds, kg).reshape(C, Hq, D).to(q.dtype)
        dkg = torch.einsum("cgij,cgid->cjgd", ds, _acc(q[a:b]).view(C, Hkv, G, D))
        dvg = torch.einsum("cgij,cgid->cjgd", p, dout)
        target = torch.where(valid, rows[a:b].long(), S).reshape(-1)
        dk.index_put_((target,), dkg.reshape(-1, Hkv, D), accumulate=True)
        dv.index_put_((target,), dvg.reshape(-1, Hkv, D), accumulate=True)
    return dq, dk[:S].to(k.dtype), dv[:S].to(v.dtype)


def check_prefill_args(q, k, v, indices, cu_seqlens, op: str = OP) -> None:
    check_qkv(q, k, v, op, "[T, Hq, D]", "[T, Hkv, D]")
    check_size(k, 0, q.shape[0], op, "k", "the token count (q.size(0))")
    check_indices(indices, q.shape[0], op, "[T, K]", 2)
    check_same_device(indices, q, op, "indices", "q")
    check_cu_seqlens(cu_seqlens, q.shape[0], q, op)


def prefill_rows(indices, cu_seqlens, total: int, packed: bool, op: str = OP) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [T, K] of the packed k/v with -1 for empty slots, sequence start per token), checked for causality."""
    starts = sequence_starts(cu_seqlens, total)
    check_causal(indices, starts, packed, op)
    if packed:
        return indices, starts
    return torch.where(indices >= 0, indices + starts[:, None], -1), starts


def sparse_attention(q, k, v, indices, cu_seqlens, *, scale: float | None = None, packed: bool = False):
    """Prefill / training forward over a packed batch: q [T, Hq, D], k/v [T, Hkv, D], indices int32 [T, K]
    (positions within each query's sequence, or packed rows with packed=True; -1 = empty), cu_seqlens [B+1].
    Returns o [T, Hq, D] (q's dtype) and lse [T, Hq] fp32."""
    check_prefill_args(q, k, v, indices, cu_seqlens)
    rows, _ = prefill_rows(indices, cu_seqlens, q.shape[0], packed)
    return attend(q, k, v, rows, default_scale(q, scale))


def check_decode_args(q, k_cache, v_cache, slots, op: str = DECODE_OP) -> None:
    check_qkv(q, k_cache, v_cache, op, "[B, n, Hq, D]", "[num_pages, page_size, Hkv, D]")
    check_tensor(slots, op, "slots", (torch.int32,), 3, "[B, n, K]")
    check_same_device(slots, q, op, "slots", "q")
    if slots.shape[:2] != q.shape[:2]:
        _fail(op, f"'slots' must have shape [{q.shape[0]}, {q.shape[1]}, K] to match 'q', got {list(slots.shape)}")
    check_int_arg(slots.shape[-1], 0, MAX_TOPK, op, "slots.size(-1)")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    _checks.check_index_range(slots, -1, num_slots - 1, op, "slots")


def sparse_attention_decode(q, k_cache, v_cache, slots, *, scale: float | None = None):
    """Decode: q [B, n, Hq, D] (n new tokens per sequence), paged caches [num_pages, page_size, Hkv, D], slots int32
    [B, n, K] (physical cache slots page * page_size + offset; -1 = empty). Returns o [B, n, Hq, D], lse [B, n, Hq]."""
    check_decode_args(q, k_cache, v_cache, slots)
    B, n, Hq, D = q.shape
    k = k_cache.reshape(-1, *k_cache.shape[2:])
    v = v_cache.reshape(-1, *v_cache.shape[2:])
    o, lse = attend(q.reshape(B * n, Hq, D), k, v, slots.reshape(B * n, -1), default_scale(q, scale))
    return o.view(B, n, Hq, D), lse.view(B, n, Hq)
