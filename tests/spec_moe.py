"""Element-by-element loops that restate the MoE permutation spec; slow, for small sizes only."""

import torch


def random_topk_ids(T, K, E, unrouted=0.1, dtype=torch.int32, device="cpu", skew=False):
    """Distinct experts per token (like torch.topk), with a fraction of slots set to -1."""
    logits = torch.randn(T, E, device=device)
    if skew:  # most tokens prefer the same few experts
        logits[:, : max(1, E // 16)] += 4.0
    ids = logits.topk(min(K, E), dim=1).indices
    if K > E:  # more slots than experts: repeat ids (legal, a token may hit an expert twice)
        ids = ids.repeat(1, (K + E - 1) // E)[:, :K]
    ids = torch.where(torch.rand(T, K, device=device) < unrouted, -1, ids)
    return ids.to(dtype)


def route(ids, E, align):
    T, K = ids.shape
    per_expert = [[] for _ in range(E)]
    for f, e in enumerate(ids.reshape(-1).tolist()):
        if 0 <= e < E:
            per_expert[e].append(f)
    offsets = [0]
    for lst in per_expert:
        offsets.append(offsets[-1] + (len(lst) + align - 1) // align * align)
    n_rows = T * K + (E * (align - 1) if align > 1 else 0)
    dest = torch.full((T * K,), -1, dtype=torch.int32)
    src = torch.full((n_rows,), -1, dtype=torch.int32)
    for e, lst in enumerate(per_expert):
        for i, f in enumerate(lst):
            dest[f] = offsets[e] + i
            src[offsets[e] + i] = f
    return dest.view(T, K), src, torch.tensor(offsets, dtype=torch.int32)


def permute(x, dest, n_rows, scale=None):
    T, K = dest.shape
    out = torch.zeros(n_rows, x.shape[1], dtype=x.dtype)
    for t in range(T):
        for k in range(K):
            d = int(dest[t, k])
            if d >= 0:
                out[d] = x[t] if scale is None else (x[t].float() * float(scale[t, k])).to(x.dtype)
    return out


def unpermute(y, dest, weights=None):
    """float64 result (the exact value the fp32 kernels approximate)."""
    T, K = dest.shape
    out = torch.zeros(T, y.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            d = int(dest[t, k])
            if d >= 0:
                out[t] += (1.0 if weights is None else float(weights[t, k])) * y[d].double()
    return out
