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
* Sparse stage, two ways by row: rows whose prefix is at most GATHER_FROM_PREFIX x topk long score the whole
  prefix as in the dense stage and gather the selected columns (cost ~ prefix); longer rows gather their selected
  keys of both attentions (the main keys once for all KV groups, in their own dtype) and score only those
  (cost ~ topk). The reference gathers
  [rows, topk, groups, head dim] main keys for every row and keeps them for its recomputing backward.

The dense stage runs every GEMM and reduction in a fixed order (no atomics): results repeat bit for bit on the same
device. In the sparse stage the gradient of k from gathered rows is added with index_add_, which uses atomics on
CUDA (keys selected by several rows add in an unspecified order) unless torch.use_deterministic_algorithms(True)
is on; the reference's autograd gather has the same property.
"""

from __future__ import annotations

import contextlib

import torch

from keye.ops.reference.dsa_indexer_loss import check_loss_args

_CHUNK_BYTES = 2 << 30  # working memory of one query chunk
# Sparse stage: rows whose prefix is longer than this many times topk gather their selected keys (cost ~ topk per
# row) instead of scoring the whole prefix and gathering columns (cost ~ prefix). Swept on the H200 (2, 3, 4, 6, 8
# at 32K and 128K tokens, NOTES.md): 4 was fastest at both.
GATHER_FROM_PREFIX = 4


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


def _indexer_logits(q, w, keys, tf32):
    """A = relu(q . key) [R, H, N] and logits = sum_h w * A [R, N], for keys [N, D] shared by the rows or [R, N, D]
    gathered per row."""
    R, H, D = q.shape
    with _tf32(tf32):
        A = torch.mm(q.reshape(R * H, D), keys.t()).view(R, H, -1) if keys.dim() == 2 else torch.bmm(q, keys.mT)
    A.clamp_min_(0.0)  # relu'd in place: A > 0 <=> relu'(A) = 1
    return A, torch.bmm(w.unsqueeze(1), A).squeeze(1)


def _indexer_grads(q, w, keys, A, dlogits, tf32):
    """(dq [R, H, D], dw [R, H], dkeys shaped like keys) from the logits' gradient dlogits [R, N]; consumes A.

    The gradient of A is w[r, h] * relu'(A) * dlogits[r, n]; w is factored out of the GEMMs (dq = w * (M . keys),
    dkeys = M^T . (w * q) with M = relu'(A) * dlogits), so M is made in place in A's memory by two passes instead of
    a new [R, H, N] tensor built from a broadcast product."""
    R, H, D = q.shape
    dw = torch.bmm(A, dlogits.unsqueeze(-1)).squeeze(-1)
    M = A.sign_().mul_(dlogits.unsqueeze(1))  # A >= 0 (relu'd): sign is relu'
    wq = q * w.unsqueeze(-1)
    with _tf32(tf32):
        if keys.dim() == 2:
            M = M.view(R * H, -1)
            dq = torch.mm(M, keys).view(R, H, D)
            dk = torch.mm(M.t(), wq.reshape(R * H, D))
        else:
            dq, dk = torch.bmm(M, keys), torch.bmm(M.mT, wq)
    return dq.mul_(w.unsqueeze(-1)), dw, dk


def _main_scores(qm, km, scale, tf32):
    """S [G, R, J, N] = scale * q_main . k_main per KV group, for the prefix keys km [G, N, Dh] shared by the rows
    (any strides). The scale is applied in the GEMM (alpha), after the exact products."""
    R, Hq, Dh = qm.shape
    G = km.shape[0]
    J = Hq // G
    qg = qm.view(R, G, J, Dh).permute(1, 0, 2, 3)  # [G, R, J, Dh]
    with _tf32(tf32):
        S = torch.baddbmm(qm.new_zeros(()), qg.reshape(G, R * J, Dh), km.mT, beta=0, alpha=scale)
    return S.view(G, R, J, -1)


def _loss_and_dlogits(logits, S, valid, need_grad):
    """KL(target || softmax(logits)) summed over rows and groups, from masked logits [R, C] and main scores
    S [G, R, J, C] (consumed); and the logits' gradient mass * softmax - p (None without need_grad)."""
    log_q = torch.where(valid, torch.log_softmax(logits, -1), 0.0)
    target = _group_target(S)  # [G, R, C]
    p_sum = target.sum(0)  # [R, C]
    loss = torch.xlogy(target, target).sum() - (p_sum * log_q).sum()
    if not need_grad:
        return loss, None
    return loss, p_sum.sum(-1, keepdim=True) * torch.where(valid, log_q.exp(), 0.0) - p_sum


def _prefix_chunk(q, w, k_pre, qm, km_pre, scale, causal_from, cols, valid, need_grad, tf32):
    """Loss of one query chunk over the sequence prefix, and its gradients (dk for the prefix keys).

    q [R, H, D], w [R, H] (already times D^-0.5), k_pre [L, D]: fp32 indexer inputs; qm [R, Hq, Dh], km_pre
    [G, L, Dh]: the main attention's. Dense stage (cols None): row r sees prefix keys l <= causal_from + r. Sparse
    stage: row r sees columns cols[r] where valid[r] (scores over the prefix, then those columns gathered).
    tf32: (indexer, main) inputs came in bf16/fp16. Returns (loss, dq, dw, dk_pre); None gradients without
    need_grad."""
    R, L = q.shape[0], k_pre.shape[0]
    A, logits = _indexer_logits(q, w, k_pre, tf32[0])
    S = _main_scores(qm, km_pre, scale, tf32[1])
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
        S = S.gather(3, cols.view(1, R, 1, C).expand(S.shape[0], R, S.shape[2], C))
        S.masked_fill_(~valid.view(1, R, 1, C), float("-inf"))
    loss, dlogits = _loss_and_dlogits(logits, S, valid, need_grad)
    if not need_grad:
        return loss, None, None, None
    if cols is not None:  # back to prefix columns
        dlogits = torch.zeros(R, L, device=q.device).scatter_add_(1, cols, dlogits)
    return (loss,) + _indexer_grads(q, w, k_pre, A, dlogits, tf32[0])


def _bmm_fp32(a, b, out, alpha):
    """out = alpha * (a @ b) in fp32 for bf16/fp16 operands: on CUDA straight from the low-precision operands (fp32
    accumulation of exact products, as the TF32 GEMMs of fp32 copies); elsewhere from fp32 copies."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        torch.bmm(a, b, out_dtype=torch.float32, out=out)
    else:
        torch.bmm(a.float(), b.float(), out=out)
    out.mul_(alpha)


class _KeyRows:
    """A sequence's keys as one row of bytes per position: the indexer key, then the main keys of all KV groups, each
    in its own dtype. The gathered path fetches a selected position with one row gather: torch's gather moves about
    1.6 G rows/s on the H200 whether a row is 128 B or 1 KB (measured), so two gathers would cost twice one."""

    def __init__(self, k, k_main):
        self.k_dtype, self.km_dtype, self.km_shape = k.dtype, k_main.dtype, k_main.shape[1:]
        self.split = k[0].numel() * k.element_size()
        self.table = torch.cat([k.reshape(len(k), -1).view(torch.uint8),
                                k_main.reshape(len(k_main), -1).view(torch.uint8)], 1)

    def gather(self, cols):
        """cols [R, C] -> (indexer keys fp32 [R, C, D], main keys [R, C, G, Dh] in their dtype)."""
        rows = self.table.index_select(0, cols.reshape(-1)).view(*cols.shape, -1)
        return (rows[..., :self.split].view(self.k_dtype).float(),
                rows[..., self.split:].view(self.km_dtype).unflatten(-1, self.km_shape))


def _gathered_chunk(q, w, keys, qm, scale, cols, valid, need_grad, tf32):
    """Sparse stage over the selected keys only: keys the sequence's _KeyRows, qm [R, Hq, Dh] in the caller's dtype,
    cols/valid [R, C] the rows' selections. Returns (loss, dq, dw, dk_sel [R, C, D]) as _prefix_chunk.
    Each KV group's scores read the gathered main keys in place (strided batched GEMM, fp32 output)."""
    R, C = cols.shape
    k_sel, km_sel = keys.gather(cols)
    A, logits = _indexer_logits(q, w, k_sel, tf32[0])
    logits.masked_fill_(~valid, float("-inf"))
    G, Dh = km_sel.shape[2], km_sel.shape[3]
    J = qm.shape[1] // G
    qg = qm.view(R, G, J, Dh)
    S = torch.empty(G, R, J, C, device=q.device)
    with _tf32(tf32[1]):
        for g in range(G):
            _bmm_fp32(qg[:, g], km_sel[:, :, g].mT, S[g], scale)
    del km_sel
    S.masked_fill_(~valid.view(1, R, 1, C), float("-inf"))
    loss, dlogits = _loss_and_dlogits(logits, S, valid, need_grad)
    if not need_grad:
        return loss, None, None, None
    return (loss,) + _indexer_grads(q, w, k_sel, A, dlogits, tf32[0])


class _IndexerLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, w, k, q_main, k_main, bounds, indices, scale, max_chunk_bytes):
        T, H, D = q.shape
        Hq, G, Dh = q_main.shape[1], k_main.shape[1], q_main.shape[2]
        need_grad = any(ctx.needs_input_grad[:3])
        dq = torch.zeros(T, H, D, device=q.device) if need_grad else None
        dw = torch.zeros(T, H, device=q.device) if need_grad else None
        dk = torch.zeros(T, D, device=q.device) if need_grad else None
        total = torch.zeros((), device=q.device)
        wscale = D ** -0.5
        # Working bytes per (row, prefix key) on the prefix path: scores (Hq), indexer products and gradient (3 H),
        # group targets (G), logits and row temporaries; per (row, selected key) on the gathered path: the gathered
        # key rows (inputs' dtypes), the fp32 indexer keys and their gradient on top of that.
        per_key = 4 * (Hq + 3 * H + G + 8)
        per_selected = per_key + G * Dh * k_main.element_size() + D * k.element_size() + 4 * 2 * D
        tf32 = (_low_precision(q, k), _low_precision(q_main, k_main))
        C = 0 if indices is None else indices.shape[1]
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            gathered = indices is not None and s1 - s0 > GATHER_FROM_PREFIX * C  # rows on the gathered path
            # only the gathered path's rows cost more than the prefix path's longest
            row_bytes = max(per_key * GATHER_FROM_PREFIX * C, per_selected * C) if gathered else per_key * (s1 - s0)
            step = max(1, max_chunk_bytes // max(1, row_bytes))
            keys = _KeyRows(k[s0:s1], k_main[s0:s1]) if gathered else None
            # fp32 prefix keys, as far as the prefix path reads them (rows past GATHER_FROM_PREFIX * C gather theirs)
            n_pre = GATHER_FROM_PREFIX * C if gathered else s1 - s0
            k_seq, km_seq = k[s0:s0 + n_pre].float(), k_main[s0:s0 + n_pre].float().permute(1, 0, 2)  # [G, n, Dh]
            for a in range(s0, s1, step):
                b = min(a + step, s1)
                L = b - s0  # prefix of the chunk's last row
                args = (q[a:b].float(), w[a:b].float() * wscale)
                cols = valid = None
                if indices is not None:
                    idx = indices[a:b].long()  # checked once for the batch by check_loss_args
                    valid, cols = idx >= 0, idx.clamp(min=0)
                if indices is not None and L > GATHER_FROM_PREFIX * C:
                    loss, gq, gw, gk = _gathered_chunk(*args, keys, q_main[a:b], scale, cols, valid, need_grad, tf32)
                else:
                    loss, gq, gw, gk = _prefix_chunk(*args, k_seq[:L], q_main[a:b].float(), km_seq[:, :L], scale,
                                                     a - s0, cols, valid, need_grad, tf32)
                total += loss
                if not need_grad:
                    continue
                dq[a:b] = gq
                dw[a:b] = gw * wscale
                if gk.dim() == 2:
                    dk[s0:b] += gk
                else:  # per selected key: atomic adds on CUDA (see the module docstring)
                    dk[s0:s1].index_add_(0, cols.reshape(-1), gk.reshape(-1, D))
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
