"""Top-k sparse GQA attention: the reference against a dense masked formula, the public ops on CPU (forward,
gradients through the registered backward, decode), and error messages."""

import pytest
import torch
import torch.nn.functional as F

import keye
from keye.ops.reference import sparse_attention as ref


def random_indices(lengths, K, *, fill=0.7, dup=False, order="sorted"):
    """Causal index sets per query (positions within its sequence), -1 padded; no duplicates unless dup."""
    rows = []
    for L in lengths:
        for t in range(L):
            n = min(K, t + 1, max(1, int(round(fill * K))) if t + 1 > K else t + 1)
            pos = torch.randperm(t + 1)[:n]
            if dup and n > 1:
                pos[-1] = pos[0]
            if order == "sorted":
                pos = pos.sort().values
            row = torch.full((K,), -1, dtype=torch.int32)
            slot = torch.randperm(K)[:n].sort().values if order == "scattered" else torch.arange(n)
            row[slot] = pos.int()
            rows.append(row)
    return torch.stack(rows)


def full_causal_indices(L, K):
    """Row t = [0, 1, ..., t, -1, ...]: every earlier position of a sequence of length L <= K."""
    pos = torch.arange(K).expand(L, K)
    return torch.where(pos <= torch.arange(L)[:, None], pos, -1).int()


def dense_masked(q, k, v, indices, lengths, scale):
    """o, lse from a dense causal score matrix restricted to each query's index set (float64)."""
    outs, lses = [], []
    s0 = 0
    G = q.shape[1] // k.shape[1]
    for L in lengths:
        qs, ks, vs = (x[s0:s0 + L].double() for x in (q, k, v))
        ks, vs = ks.repeat_interleave(G, 1), vs.repeat_interleave(G, 1)
        s = torch.einsum("thd,shd->hts", qs, ks) * scale
        mask = torch.zeros(L, L, dtype=torch.bool)
        idx = indices[s0:s0 + L].long()
        r, c = (idx >= 0).nonzero(as_tuple=True)
        mask[r, idx[r, c]] = True
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
        outs.append(torch.einsum("hts,shd->thd", p, vs))
        lses.append(lse.T)
        s0 += L
    return torch.cat(outs), torch.cat(lses)


def packed_inputs(lengths, Hq, Hkv, D, dtype=torch.float32):
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, D, dtype=dtype) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (32, 4), (16, 1)])
@pytest.mark.parametrize("order", ["sorted", "scattered"])
def test_reference_equals_dense_masked(Hq, Hkv, order):
    lengths, K, D = [5, 23, 1, 40], 16, 32
    q, k, v, cu = packed_inputs(lengths, Hq, Hkv, D)
    idx = random_indices(lengths, K, order=order)
    o, lse = ref.sparse_attention(q, k, v, idx, cu)
    o_ref, lse_ref = dense_masked(q, k, v, idx, lengths, D ** -0.5)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


def test_packed_rows_equal_positions():
    lengths, K = [7, 12], 8
    q, k, v, cu = packed_inputs(lengths, 8, 2, 16)
    idx = random_indices(lengths, K)
    starts = ref.sequence_starts(cu, q.shape[0])
    packed = torch.where(idx >= 0, idx + starts[:, None], -1)
    o1, l1 = keye.ops.sparse_attention(q, k, v, idx, cu)
    o2, l2 = keye.ops.sparse_attention(q, k, v, packed, cu, packed=True)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)


def test_duplicates_count_twice_and_empty_rows():
    q, k, v, cu = packed_inputs([3], 2, 1, 8)
    idx = torch.tensor([[0, 0, -1], [-1, -1, -1], [2, 1, 2]], dtype=torch.int32)
    o, lse = keye.ops.sparse_attention(q, k, v, idx, cu)
    s = (q[0, 0] @ k[0, 0]) * 8 ** -0.5
    torch.testing.assert_close(lse[0, 0], s + torch.log(torch.tensor(2.0)))
    torch.testing.assert_close(o[0, 0], v[0, 0])
    assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.isneginf(lse[1]).all()
    w = torch.softmax(torch.stack([q[2, 1] @ k[2, 0], q[2, 1] @ k[1, 0], q[2, 1] @ k[2, 0]]) * 8 ** -0.5, 0)
    torch.testing.assert_close(o[2, 1], w[0] * v[2, 0] + w[1] * v[1, 0] + w[2] * v[2, 0])


def test_full_index_sets_equal_dense_causal_attention():
    lengths, K, Hq, Hkv, D = [9, 16], 16, 8, 2, 32
    q, k, v, cu = packed_inputs(lengths, Hq, Hkv, D)
    idx = torch.cat([full_causal_indices(L, K) for L in lengths])
    o, _ = keye.ops.sparse_attention(q, k, v, idx.int(), cu)
    s0 = 0
    for L in lengths:
        sl = slice(s0, s0 + L)
        sdpa = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1).repeat_interleave(Hq // Hkv, 0),
                                              v[sl].transpose(0, 1).repeat_interleave(Hq // Hkv, 0), is_causal=True)
        torch.testing.assert_close(o[sl], sdpa.transpose(0, 1), rtol=1e-5, atol=1e-5)
        s0 += L


def test_gradients_match_autograd_of_the_reference():
    lengths, K, Hq, Hkv, D = [6, 19], 8, 8, 2, 16
    q, k, v, cu = packed_inputs(lengths, Hq, Hkv, D, torch.float64)
    idx = random_indices(lengths, K, dup=True)
    idx[3] = -1  # a query without keys
    wo, wl = torch.randn_like(q), torch.randn(q.shape[:2], dtype=torch.float64)

    def loss(fn):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        o, lse = fn(qq, kk, vv)
        ((o * wo).sum() + (lse.nan_to_num(neginf=0) * wl).sum()).backward()
        return qq.grad, kk.grad, vv.grad

    starts = ref.sequence_starts(cu, q.shape[0])
    rows = torch.where(idx >= 0, idx + starts[:, None], -1)
    got = loss(lambda a, b, c: keye.ops.sparse_attention(a, b, c, idx, cu))
    want = loss(lambda a, b, c: ref.attend(a, b, c, rows, D ** -0.5, chunk_bytes=1 << 12))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    assert torch.equal(got[0][3], torch.zeros_like(got[0][3]))


def test_decode_equals_attend_on_the_flat_cache():
    B, n, Hq, Hkv, D, page, pages, K = 3, 2, 8, 2, 16, 4, 10, 12
    q = torch.randn(B, n, Hq, D)
    kc, vc = torch.randn(pages, page, Hkv, D), torch.randn(pages, page, Hkv, D)
    slots = torch.randint(-1, pages * page, (B, n, K), dtype=torch.int32)
    o, lse = keye.ops.sparse_attention_decode(q, kc, vc, slots)
    o2, l2 = ref.attend(q.view(B * n, Hq, D), kc.view(-1, Hkv, D), vc.view(-1, Hkv, D), slots.view(B * n, K), D ** -0.5)
    torch.testing.assert_close(o, o2.view(B, n, Hq, D), rtol=0, atol=0)
    torch.testing.assert_close(lse, l2.view(B, n, Hq), rtol=0, atol=0)


def test_opcheck_cpu():
    lengths, K = [5, 9], 4
    q, k, v, cu = packed_inputs(lengths, 4, 2, 8)
    idx = random_indices(lengths, K)
    starts = ref.sequence_starts(cu, q.shape[0])
    for x in (q, k, v):
        x.requires_grad_()
    torch.library.opcheck(torch.ops.keye.sparse_attention.default, (q, k, v, idx, starts, 0.25, 1))


@pytest.mark.parametrize("case,message", [
    ("dtype", "argument 'k' must have dtype float32"),
    ("heads", "query heads (6) must be a multiple of the KV heads (4)"),
    ("future", "must hold -1 or causal positions"),
    ("below", "must hold -1 or causal positions"),
    ("cu", "'cu_seqlens' must start at 0"),
    ("idx_rows", "argument 'indices' has size 5 in dim 0"),
])
def test_prefill_errors(case, message):
    q, k, v, cu = packed_inputs([3, 3], 4, 2, 8)
    idx = torch.zeros(6, 2, dtype=torch.int32)
    if case == "dtype":
        k = k.half()
    elif case == "heads":
        q, k, v = torch.randn(6, 6, 8), torch.randn(6, 4, 8), torch.randn(6, 4, 8)
    elif case == "future":
        idx[4, 1] = 2  # position 1 of sequence 2 may not see position 2
    elif case == "below":
        idx[0, 0] = -2
    elif case == "cu":
        cu = torch.tensor([0, 4, 5], dtype=torch.int32)
    elif case == "idx_rows":
        idx = idx[:5]
    with pytest.raises(ValueError, match="keye.sparse_attention: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        keye.ops.sparse_attention(q, k, v, idx, cu)


def test_decode_errors():
    q, kc, vc = torch.randn(2, 1, 4, 8), torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8)
    with pytest.raises(ValueError, match=r"keye.sparse_attention_decode: argument 'slots' must hold values in \[-1, 11\]"):
        keye.ops.sparse_attention_decode(q, kc, vc, torch.full((2, 1, 3), 12, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"'slots' must have shape \[2, 1, K\]"):
        keye.ops.sparse_attention_decode(q, kc, vc, torch.zeros(2, 2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="'k' and 'v' must have the same shape"):
        keye.ops.sparse_attention_decode(q, kc, vc[:2], torch.zeros(2, 1, 3, dtype=torch.int32))


def test_traces_under_torch_compile_fullgraph():
    """With index checks off (no host syncs) forward and backward trace as one graph and match eager."""
    lengths, K = [15, 25], 6
    q, k, v, cu = packed_inputs(lengths, 8, 2, 16)
    idx = random_indices(lengths, K)

    def loss(q, k, v):
        o, lse = keye.ops.sparse_attention(q, k, v, idx, cu)
        return (o * o).sum() + lse.sum()

    grads = []
    with keye.ops.index_checks(False):
        for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
            xs = [x.clone().requires_grad_() for x in (q, k, v)]
            fn(*xs).backward()
            grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("K", [512, 2048])
@pytest.mark.parametrize("T", [1, 63, 2048, 2049, 3001])
def test_bench_index_patterns_are_causal_at_any_length(T, K):
    """The benchmark's index patterns at lengths below, at and above k (`keye bench --tokens 64` once crashed in
    realistic_indices: an empty arange(k, T) for T < k; and k = 512 once asked for a negative number of tail
    positions): shape [T, k], every entry -1 or an earlier position, and every query of a sequence no longer than k
    selects exactly its whole past."""
    from keye.bench.sparse_attention import realistic_indices, uniform_indices

    pos = torch.arange(T)[:, None]
    for make in (realistic_indices, uniform_indices):
        idx = make(T, K, "cpu")
        assert idx.shape == (T, K) and idx.dtype == torch.int32, make.__name__
        assert torch.all((idx == -1) | ((idx >= 0) & (idx <= pos))), make.__name__
        head = min(T, K)
        want = torch.where(torch.arange(K) <= pos[:head], torch.arange(K), -1).int()
        assert torch.equal(idx[:head], want), make.__name__


def test_fixed_point_scales_bound_every_sum_of_absolute_addends():
    """The deterministic backward's scales (keye.ops.sparse_attention.fixed_point_scales): for each gradient the
    sum of the absolute addends of any element, times its scale, stays below 2^61 (no int64 overflow), yet not so
    far below that precision is thrown away; computed densely in fp64 with duplicated keys in the lists."""
    from keye.ops.sparse_attention import fixed_point_scales

    torch.manual_seed(3)
    N, Hq, Hkv, D, K = 40, 8, 2, 64, 48
    G, scale = Hq // Hkv, D ** -0.5
    q, k, v = (torch.randn(N, h, D, dtype=torch.float64) * m for h, m in ((Hq, 2.0), (Hkv, 1.5), (Hkv, 3.0)))
    rows = torch.randint(0, N, (N, K))
    rows = torch.minimum(rows, torch.arange(N)[:, None])  # causal, with many repeats
    do, dlse = torch.randn(N, Hq, D, dtype=torch.float64) * 0.1, torch.randn(N, Hq, dtype=torch.float64)
    kh, vh = k.repeat_interleave(G, 1)[rows], v.repeat_interleave(G, 1)[rows]  # [N, K, Hq, D], duplicates kept
    s = torch.einsum("nhd,nkhd->nhk", q, kh) * scale
    p = torch.softmax(s, -1)
    o = torch.einsum("nhk,nkhd->nhd", p, vh)
    delta = (do * o).sum(-1) - dlse
    ds = p * (torch.einsum("nhd,nkhd->nhk", do, vh) - delta[..., None]) * scale
    abs_dq = torch.einsum("nhk,nkhd->nhd", ds.abs(), kh.abs())
    abs_dk, abs_dv = torch.zeros(N, Hq, D, dtype=torch.float64), torch.zeros(N, Hq, D, dtype=torch.float64)
    abs_dk.index_add_(0, rows.reshape(-1), torch.einsum("nhk,nhd->nkhd", ds.abs(), q.abs()).reshape(-1, Hq, D))
    abs_dv.index_add_(0, rows.reshape(-1), torch.einsum("nhk,nhd->nkhd", p, do.abs()).reshape(-1, Hq, D))
    abs_dk, abs_dv = (a.view(N, Hkv, G, D).sum(2) for a in (abs_dk, abs_dv))
    fixed, unscale = fixed_point_scales(q.bfloat16(), k.bfloat16(), v.bfloat16(), do.float(), delta.float(), scale, K)
    assert torch.equal(fixed.double() * unscale.double(), torch.ones(3, dtype=torch.float64))
    for a, f in zip((abs_dq, abs_dk, abs_dv), fixed.double()):
        top = float(a.max() * f)
        assert 2.0 ** 36 < top < 2.0 ** 61, top
    zero = fixed_point_scales(*(torch.zeros_like(x) for x in (q, k, v, do)), torch.zeros_like(delta), scale, K)
    assert torch.isfinite(zero[0]).all() and torch.isfinite(zero[1]).all()
    do[0, 0, 0] = float("inf")
    assert torch.isnan(fixed_point_scales(q, k, v, do, delta, scale, K)[1]).all()
