"""Specification of the DSA indexer training losses (dense warm-up and sparse stage).

For query t of a sequence and KV group g of the main GQA attention (Hq query heads, Hkv groups):

* the target p[t, g, :] is the main attention's distribution for that group: the post-softmax attention
  of each of the group's Hq/Hkv query heads, summed and L1-normalised (divided by Hq/Hkv);
* the indexer distribution is softmax(I[t, :]) with the training-time score
  I[t, s] = sum_h w[t, h] * D_I^-0.5 * ReLU(q[t, h] . k[s])  (fp32 math, no FP8: FP8 is not differentiable);
* loss = sum_t sum_g KL(p[t, g, :] || softmax(I[t, :])).

Dense warm-up: over all causal keys s <= t of the sequence. Sparse stage: over the selected set S_t only
(``indices``, positions within the sequence, -1 = empty); there both distributions live on S_t: the target is
what sparse attention computes, softmax over S_t of each head's scores, summed over the group's heads and
L1-normalised, and the indexer's softmax is taken over S_t.

The main attention (q_main, k_main) is the target and is detached. Gradients flow to q, k and w. Queries are
processed in chunks recomputed in backward (activation checkpointing), so memory stays O(chunk x T).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from keye.ops import _checks
from keye.ops._checks import check_same_device, check_size, check_tensor
from keye.ops.reference.dsa_indexer import check_cu_seqlens

_CHUNK_BYTES = 256 << 20
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _kl(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of p * (log p - log q), with 0 * anything = 0 (masked keys have p = 0)."""
    return torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q), 0.0).sum()


def _group_target(scores: torch.Tensor, valid: torch.Tensor, groups: int) -> torch.Tensor:
    """scores [R, Hq, L] (masked keys already -inf) -> per-group distribution [R, groups, L]."""
    R, Hq, L = scores.shape
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return probs.view(R, groups, Hq // groups, L).sum(2) * (groups / Hq) * valid.unsqueeze(1)


def _dense_chunk(q, w, k, q_main, k_main, n_prev, scale):
    """Loss of query rows [R] whose sequence prefix is k/k_main [L]; row i is at position n_prev + i."""
    R, L = q.shape[0], k.shape[0]
    D = q.shape[-1]
    pos = torch.arange(L, device=q.device).unsqueeze(0)
    valid = pos <= (n_prev + torch.arange(R, device=q.device)).unsqueeze(1)  # [R, L]
    logits = torch.einsum("rh,rhs->rs", w.float() * D ** -0.5, torch.einsum("rhd,sd->rhs", q.float(), k.float()).relu())
    log_q = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    with torch.no_grad():
        G = k_main.shape[1]
        qm = q_main.float().view(R, G, -1, q_main.shape[-1])
        s = torch.einsum("rgjd,sgd->rgjs", qm, k_main.float()).reshape(R, -1, L) * scale
        p = _group_target(s.masked_fill(~valid.unsqueeze(1), float("-inf")), valid, G)
    return _kl(p, log_q.unsqueeze(1))


def _sparse_chunk(q, w, k_sel, q_main, k_main_sel, valid, scale):
    """Loss of query rows [R] over their selected keys: k_sel [R, K, D_I], k_main_sel [R, K, G, Dh]."""
    D = q.shape[-1]
    logits = torch.einsum("rh,rhk->rk", w.float() * D ** -0.5, torch.einsum("rhd,rkd->rhk", q.float(), k_sel.float()).relu())
    log_q = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    with torch.no_grad():
        R, K, G, _ = k_main_sel.shape
        qm = q_main.float().view(R, G, -1, q_main.shape[-1])
        s = torch.einsum("rgjd,rkgd->rgjk", qm, k_main_sel.float()).reshape(R, -1, K) * scale
        p = _group_target(s.masked_fill(~valid.unsqueeze(1), float("-inf")), valid, G)
    return _kl(p, log_q.unsqueeze(1))


def check_loss_args(q, w, k, q_main, k_main, cu_seqlens, indices, softmax_scale) -> tuple[list[int], float]:
    """Validates indexer_loss's arguments (shared with keye/ops/dsa_indexer_loss.py); returns the sequence bounds
    and the main attention's softmax scale."""
    op = "indexer_loss"
    check_tensor(q, op, "q", FLOATS, 3, "[T, H_I, D_I]")
    T, H, D = q.shape
    check_tensor(w, op, "w", FLOATS, 2, "[T, H_I]")
    check_tensor(k, op, "k", FLOATS, 2, "[T, D_I]")
    check_tensor(q_main, op, "q_main", FLOATS, 3, "[T, Hq, Dh]")
    check_tensor(k_main, op, "k_main", FLOATS, 3, "[T, Hkv, Dh]")
    for name, t in (("w", w), ("k", k), ("q_main", q_main), ("k_main", k_main)):
        check_same_device(t, q, op, name, "q")
        check_size(t, 0, T, op, name, "the token count (q.size(0))")
    check_size(w, 1, H, op, "w", "H_I (q.size(1))")
    check_size(k, 1, D, op, "k", "D_I (q.size(2))")
    Hq, G, Dh = q_main.shape[1], k_main.shape[1], q_main.shape[2]
    if G == 0 or Hq % G:
        raise ValueError(f"keye.{op}: the query heads of 'q_main' ({Hq}) must be a multiple of the KV heads "
                         f"of 'k_main' ({G})")
    check_size(k_main, 2, Dh, op, "k_main", "the head dim of q_main")
    bounds = check_cu_seqlens(cu_seqlens, T, op)
    if indices is not None:
        check_tensor(indices, op, "indices", (torch.int32, torch.int64), 2, "[T, topk]")
        check_same_device(indices, q, op, "indices", "q")
        check_size(indices, 0, T, op, "indices", "the token count (q.size(0))")
        check_selection(indices, bounds)
    return bounds, Dh ** -0.5 if softmax_scale is None else float(softmax_scale)


def check_selection(indices: torch.Tensor, bounds: list[int]) -> None:
    """Every entry of indices is -1 or a position at most its own row's within its sequence: one check over the
    whole batch (one device sync), skipped with keye.ops.index_checks(False) or during CUDA graph capture."""
    if not _checks._index_checks or indices.numel() == 0 or _checks._capturing(indices):
        return
    dev = indices.device
    starts = torch.tensor(bounds[:-1], device=dev)
    lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=dev)
    pos = (torch.arange(indices.shape[0], device=dev) - torch.repeat_interleave(starts, lengths)).unsqueeze(1)
    bad = ((indices > pos) | (indices < -1)).any(1)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        _checks._fail("indexer_loss", f"'indices' row {r} points outside [-1, {int(pos[r])}] (-1 or a position "
                                      "at most the row's own within its sequence)")


def indexer_loss(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_main: torch.Tensor, k_main: torch.Tensor,
                 cu_seqlens: torch.Tensor, indices: torch.Tensor | None = None, softmax_scale: float | None = None,
                 max_chunk_bytes: int = _CHUNK_BYTES) -> torch.Tensor:
    """Indexer KL loss (fp32 scalar): dense warm-up when indices is None, else the sparse stage.

    q [T, H_I, D_I], w [T, H_I], k [T, D_I]: indexer activations (differentiable).
    q_main [T, Hq, Dh], k_main [T, Hkv, Dh]: main attention queries/keys after RoPE (the target; detached).
    indices [T, topk] int32: selected positions within each sequence (-1 = empty).
    softmax_scale: the main attention's, default Dh^-0.5.
    """
    bounds, scale = check_loss_args(q, w, k, q_main, k_main, cu_seqlens, indices, softmax_scale)
    H, D = q.shape[1:]
    Hq, G, Dh = q_main.shape[1], k_main.shape[1], q_main.shape[2]
    q_main, k_main = q_main.detach(), k_main.detach()
    # fp32 copies of the differentiable inputs: every chunk adds its gradient into k's prefix, and autograd
    # accumulates in the leaf's dtype, so with bf16 leaves that sum was rounded to bf16 once per chunk (dk off by
    # 8e-3 with ~100 chunks, 4e-2 at 32K tokens); now it is rounded once, by the copy's backward.
    q, w, k = q.float(), w.float(), k.float()
    total = q.new_zeros((), dtype=torch.float32)
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        if indices is None:
            step = max(1, max_chunk_bytes // (4 * (Hq + H + 4) * max(1, s1 - s0)))
        else:
            step = max(1, max_chunk_bytes // (4 * (Hq + H + G * Dh + D + 4) * indices.shape[1]))
        for a in range(s0, s1, step):
            b = min(a + step, s1)
            if indices is None:
                total = total + checkpoint(_dense_chunk, q[a:b], w[a:b], k[s0:b], q_main[a:b], k_main[s0:b],
                                           a - s0, scale, use_reentrant=False)
            else:
                idx = indices[a:b].long()
                valid = idx >= 0
                rows = s0 + idx.clamp(min=0)
                total = total + checkpoint(_sparse_chunk, q[a:b], w[a:b], k[rows], q_main[a:b], k_main[rows],
                                           valid, scale, use_reentrant=False)
    return total
