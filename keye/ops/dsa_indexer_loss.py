"""The DSA indexer's training losses (dense warm-up and sparse stage), computed for speed.

The specification is keye/ops/reference/dsa_indexer_loss.py (same arguments, same loss). This path differs in how it
computes, not in what:

* Gradients in the forward. The loss is a sum over query chunks of KL(p || softmax(I)), whose gradient with respect
  to a chunk's indexer logits is mass * softmax(I) - p (mass = sum of p over the row's groups). Each chunk's
  gradients with respect to q, w and k are computed right after its loss, so nothing is recomputed in backward (the
  reference checkpoints every chunk and runs the whole chunk, target included, twice) and no autograd graph holds
  [rows, heads, keys] activations. backward() only scales the stored gradients (no double backward).
* The target without a softmax per head over materialised probabilities: per head the row maximum and the sum of
  exp, then one batched matmul that sums the group's heads with weights 1 / (sum * heads per group).
* The main attention's scores S = q_main . k_main as one batched GEMM per KV group. With bf16/fp16 inputs the GEMMs
  run in TF32 (fp32 accumulation): exact for the score GEMMs (TF32 holds bf16/fp16 values exactly), and for the two
  gradient GEMMs a rounding of the fp32 logit gradient to 11 bits, below the bf16/fp16 gradients they produce. The
  memory-bound products (head sums, group sums) stay fp32. fp32 inputs: fp32 GEMMs (or the caller's TF32 setting).
* Sparse stage: scores over the sequence prefix as in the dense stage, then the selected columns gathered (a
  gather of selected main keys, [rows, topk, groups, head dim], is what made the reference slow). The cost is that
  of the dense stage, O(rows x prefix); a kernel over the selected keys alone is the step after this one.

Every GEMM and reduction runs in a fixed order (no atomics), so results repeat bit for bit on the same device; the
only scatter adds into distinct columns (selected positions of one row are distinct; repeated ones add in an
unspecified order).
"""

from __future__ import annotations

import contextlib

import torch

from keye.ops.reference.dsa_indexer_loss import check_loss_args, checked_rows

_CHUNK_BYTES = 2 << 30  # working memory of one query chunk


@contextlib.contextmanager
def _tf32(allow: bool):
    """TF32 matmuls inside when `allow` (inputs came in bf16/fp16; see the module docstring); otherwise the caller's
    setting."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = old or allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _low_precision(*tensors) -> bool:
    return all(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)


def _group_target(S: torch.Tensor) -> torch.Tensor:
    """S [G, R, J, C] scaled main-attention scores (masked entries -inf; consumed) -> the per-group target
    [G, R, C]: each head's softmax over C, summed over the group's J heads, / J. Rows with no valid column give 0."""
    m = S.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    S.sub_(m).exp_()
    inv = 1.0 / (S.sum(-1, keepdim=True) * S.shape[2])  # [G, R, J, 1]; inf for an empty row
    inv = torch.where(torch.isfinite(inv), inv, 0.0)
    return torch.matmul(inv.transpose(-1, -2), S).squeeze(-2)  # [G, R, 1, J] @ [G, R, J, C]


def _chunk(q, w, k_pre, qm, km_pre, scale, causal_from, cols, valid, need_grad, tf32):
    """Loss of one query chunk of one sequence, and its gradients.

    q [R, H, D], w [R, H] (already times D^-0.5), k_pre [L, D]: fp32 indexer inputs over the sequence prefix;
    qm [R, Hq, Dh], km_pre [L, G, Dh]: the main attention's. Dense stage (cols None): row r sees prefix keys
    l <= causal_from + r. Sparse stage: row r sees columns cols[r] where valid[r]. tf32: (indexer, main) inputs
    came in bf16/fp16, so their GEMMs may run in TF32.
    Returns (loss, dq, dw, dk_pre) with None gradients when need_grad is False."""
    R, H, D = q.shape
    L, G, Dh = km_pre.shape
    J = qm.shape[1] // G
    # Indexer logits over the prefix: relu(q . k) per head, weighted sum over heads.
    with _tf32(tf32[0]):
        A = torch.mm(q.reshape(R * H, D), k_pre.t()).view(R, H, L).clamp_min_(0.0)  # A > 0 <=> relu'(A) = 1
    logits = torch.bmm(w.unsqueeze(1), A).squeeze(1)  # [R, L]
    # Main attention scores per KV group, [G, R, J, L]; the softmax scale applied in the GEMM (alpha), after the
    # exact products.
    qg = qm.view(R, G, J, Dh).permute(1, 0, 2, 3).reshape(G, R * J, Dh)
    with _tf32(tf32[1]):
        S = torch.baddbmm(qg.new_zeros(()), qg, km_pre.permute(1, 2, 0), beta=0, alpha=scale).view(G, R, J, L)
    if cols is None:
        tail = L - causal_from  # only the last columns can be past a row's position: column causal_from + j, row r
        if tail > 0:
            masked = torch.arange(tail, device=q.device).unsqueeze(0) > torch.arange(R, device=q.device).unsqueeze(1)
            logits[:, L - tail:].masked_fill_(masked, float("-inf"))
            S[..., L - tail:].masked_fill_(masked.view(1, R, 1, tail), float("-inf"))
        valid = torch.isfinite(logits)
    else:
        C = cols.shape[1]
        logits = logits.gather(1, cols).masked_fill_(~valid, float("-inf"))
        S = S.gather(3, cols.view(1, R, 1, C).expand(G, R, J, C))
        S.masked_fill_(~valid.view(1, R, 1, C), float("-inf"))
    log_q = torch.where(valid, torch.log_softmax(logits, -1), 0.0)
    target = _group_target(S)  # [G, R, C]
    p_sum = target.sum(0)  # [R, C]
    loss = torch.xlogy(target, target).sum() - (p_sum * log_q).sum()
    if not need_grad:
        return loss, None, None, None
    mass = p_sum.sum(-1, keepdim=True)
    dlogits = mass * torch.where(valid, log_q.exp(), 0.0) - p_sum
    if cols is not None:  # back to prefix columns
        dlogits = torch.zeros(R, L, device=q.device).scatter_add_(1, cols, dlogits)
    dw = torch.bmm(A, dlogits.unsqueeze(-1)).squeeze(-1)  # [R, H]
    dA = torch.where(A > 0, w.unsqueeze(-1) * dlogits.unsqueeze(1), 0.0).view(R * H, L)
    with _tf32(tf32[0]):
        dq = torch.mm(dA, k_pre).view(R, H, D)
        dk = torch.mm(dA.t(), q.reshape(R * H, D))
    return loss, dq, dw, dk


class _IndexerLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, w, k, q_main, k_main, bounds, indices, scale, max_chunk_bytes):
        T, H, D = q.shape
        Hq, G = q_main.shape[1], k_main.shape[1]
        need_grad = any(ctx.needs_input_grad[:3])
        dq = torch.zeros(T, H, D, device=q.device) if need_grad else None
        dw = torch.zeros(T, H, device=q.device) if need_grad else None
        dk = torch.zeros(T, D, device=q.device) if need_grad else None
        total = torch.zeros((), device=q.device)
        wscale = D ** -0.5
        # Bytes per (row, prefix key): scores and their exponentials (Hq), indexer products and gradient (3 H), the
        # group targets (G), logits and row temporaries.
        per_key = 4 * (Hq + 3 * H + G + 8)
        tf32 = (_low_precision(q, k), _low_precision(q_main, k_main))
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            step = max(1, max_chunk_bytes // (per_key * max(1, s1 - s0)))
            kf, kmf = k[s0:s1].float(), k_main[s0:s1].float()
            for a in range(s0, s1, step):
                b = min(a + step, s1)
                cols = valid = None
                if indices is not None:
                    idx = checked_rows(indices, a, b, s0)
                    valid, cols = idx >= 0, idx.clamp(min=0)
                loss, gq, gw, gk = _chunk(q[a:b].float(), w[a:b].float() * wscale, kf[: b - s0], q_main[a:b].float(),
                                          kmf[: b - s0], scale, a - s0, cols, valid, need_grad, tf32)
                total += loss
                if need_grad:
                    dq[a:b] = gq
                    dw[a:b] = gw * wscale
                    dk[s0:b] += gk
        ctx.save_for_backward(*(t for t in (dq, dw, dk) if t is not None))
        ctx.dtypes = (q.dtype, w.dtype, k.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        if not ctx.saved_tensors:
            return (None,) * 9
        dq, dw, dk = ctx.saved_tensors
        gq, gw, gk = ((g * grad).to(dt) for g, dt in zip((dq, dw, dk), ctx.dtypes))
        return gq, gw, gk, None, None, None, None, None, None


def indexer_loss(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_main: torch.Tensor, k_main: torch.Tensor,
                 cu_seqlens: torch.Tensor, indices: torch.Tensor | None = None, softmax_scale: float | None = None,
                 max_chunk_bytes: int = _CHUNK_BYTES) -> torch.Tensor:
    """Indexer KL loss (fp32 scalar): dense warm-up when indices is None, else the sparse stage.

    q [T, H_I, D_I], w [T, H_I], k [T, D_I]: indexer activations (differentiable; gradients come back in their
    dtypes). q_main [T, Hq, Dh], k_main [T, Hkv, Dh]: main attention queries/keys after RoPE (the target; no
    gradient). indices [T, topk] int32/int64: selected positions within each sequence (-1 = empty).
    softmax_scale: the main attention's, default Dh^-0.5. max_chunk_bytes: working memory of one query chunk.
    Same loss as keye.ops.reference.indexer_loss (the specification); see this module's docstring for how it
    differs. Supports one backward (the gradients are computed in the forward).
    """
    bounds, scale = check_loss_args(q, w, k, q_main, k_main, cu_seqlens, indices, softmax_scale)
    return _IndexerLoss.apply(q, w, k, q_main.detach(), k_main.detach(), bounds, indices, scale, max_chunk_bytes)


__all__ = ["indexer_loss"]
