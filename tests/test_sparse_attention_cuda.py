"""Top-k sparse GQA attention kernel (H200) against the fp32 reference: every head ratio, D 64/128, unstructured
and structured index sets with -1 padding, varlen, splits, paged decode, CUDA graphs, gradients, opcheck, errors."""

import pytest
import torch
import torch.nn.functional as F

import keye
from conftest import poison_next_alloc, rel_err
from keye.ops.reference import sparse_attention as ref

pytestmark = pytest.mark.gpu
DEV = "cuda"
O_RTOL = 1e-2     # norm-wise relative error of o (bf16 inputs and P in bf16 vs fp32 math)
LSE_ATOL = 2e-3   # lse is fp32 math over bf16 inputs: only summation order differs


def causal_indices(lengths, K, fill=1.0, device=DEV):
    """Random causal index sets (positions within the sequence), sorted, -1 padded."""
    out = []
    for L in lengths:
        t = torch.arange(L, device=device)
        keys = torch.rand(L, L, device=device).masked_fill(torch.ones(L, L, dtype=torch.bool, device=device).triu(1), 2.0)
        n = torch.clamp((t + 1).float() * fill, min=1).long().clamp(max=K)
        order = keys.argsort(dim=1)[:, :K]
        pos = torch.arange(order.shape[1], device=device)
        sel = torch.where(pos[None, :] < n[:, None], order, torch.full_like(order, 1 << 30)).sort(dim=1).values
        sel = torch.where(sel >= 1 << 30, -1, sel)
        if sel.shape[1] < K:
            sel = torch.cat([sel, sel.new_full((L, K - sel.shape[1]), -1)], 1)
        out.append(sel.int())
    return torch.cat(out)


def inputs(lengths, Hq, Hkv, D):
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, D, device=DEV, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    return q, k, v, cu


def check_forward(q, k, v, idx, cu, **kw):
    T, Hq, D = q.shape
    poison_next_alloc(q.numel() * 2)
    o, lse = keye.ops.sparse_attention(q, k, v, idx, cu, **kw)
    o_ref, lse_ref = ref.sparse_attention(q.float(), k.float(), v.float(), idx, cu, **kw)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel_err(o, o_ref) < O_RTOL
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - lse_ref[finite]).abs().max() < LSE_ATOL
    assert torch.equal(o[~finite], torch.zeros_like(o[~finite]))
    return o, lse


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 4), (32, 4), (16, 1), (12, 2), (48, 3)])
def test_forward_head_ratios(D, Hq, Hkv):
    q, k, v, cu = inputs([300, 77], Hq, Hkv, D)
    check_forward(q, k, v, causal_indices([300, 77], 128), cu)


@pytest.mark.parametrize("K", [1, 16, 17, 64, 100, 2048])
def test_forward_topk_sizes_and_short_sequences(K):
    lengths = [1, 5, 2047, 2048, 2049] if K == 2048 else [1, 5, 2 * K + 3]
    q, k, v, cu = inputs(lengths, 32, 4, 128)
    check_forward(q, k, v, causal_indices(lengths, K), cu)


def test_forward_unstructured_padding_and_duplicates():
    lengths, K = [513, 1000], 256
    q, k, v, cu = inputs(lengths, 32, 4, 128)
    idx = causal_indices(lengths, K, fill=0.6)
    perm = torch.rand(idx.shape, device=DEV).argsort(dim=1)  # -1 slots anywhere, not only at the end
    idx = idx.gather(1, perm)
    idx[:, 1] = idx[:, 0]  # duplicates count twice
    idx[7] = -1  # a query with no keys: o = 0, lse = -inf
    check_forward(q, k, v, idx, cu)
    starts = torch.tensor([0] * 513 + [513] * 1000, device=DEV, dtype=torch.int32)
    check_forward(q, k, v, torch.where(idx >= 0, idx + starts[:, None], -1), cu, packed=True)


@pytest.mark.parametrize("Hq,Hkv", [(32, 4), (8, 4), (16, 1)])
def test_forward_neighbours_share_keys(Hq, Hkv):
    """Sorted index sets that overlap (the pair kernel gathers shared rows once): the bench's realistic pattern,
    pairs of identical rows, and a pair whose second list is a subset of the first."""
    from keye.bench.sparse_attention import realistic_indices

    T, K = 3001, 1024
    q, k, v, cu = inputs([T], Hq, Hkv, 128)
    same = causal_indices([T], K)
    same[1::2] = same[0:-1:2]  # query 2i+1 selects exactly what query 2i selects (all causal for 2i+1)
    check_forward(q, k, v, same, cu)
    subset = same.clone()
    subset[1::2, ::3] = -1  # ... or a subset of it, still sorted with the empty slots last
    big = torch.iinfo(torch.int32).max
    subset = torch.where(subset < 0, big, subset).sort(dim=1).values
    subset = torch.where(subset == big, -1, subset)
    check_forward(q, k, v, subset, cu)
    T2 = 4000
    q, k, v, cu = inputs([T2], Hq, Hkv, 128)
    check_forward(q, k, v, realistic_indices(T2, 2048, DEV), cu)


def _fwd(q, k, v, idx, share_blocks, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.keye.sparse_attention_fwd(q, k, v, idx, None, scale, 1, True, share_blocks)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(32, 4), (8, 4), (4, 4)])
def test_block_kernel_common_and_private_rows(D, Hq, Hkv):
    """The 16-query block kernel (the prefill default): a block whose lists are all identical (everything common),
    blocks straddling sequence boundaries (nothing common), a query without keys, a tail block of 6 queries."""
    lengths, K = [37, 1000, 61], 256  # 1098 queries: boundaries inside blocks, 68 full blocks + 10
    q, k, v, cu = inputs(lengths, Hq, Hkv, D)
    idx = causal_indices(lengths, K)
    idx[48:64] = idx[48]  # local positions 11..26 of sequence 2 all select query 48's (causal) list
    idx[100] = -1
    check_forward(q, k, v, idx, cu)
    for T in (3, 17):  # one block of 3 queries; a full block and one query
        q, k, v, cu = inputs([T], Hq, Hkv, D)
        check_forward(q, k, v, causal_indices([T], 8), cu)


@pytest.mark.parametrize("D", [64, 128])
def test_block_kernel_common_sets_of_every_stage_shape(D):
    """Blocks whose 16 lists share exactly L rows, L from 1 to past the common ring (a partial 16-key tile, whole
    tiles, an odd tile count, partial and whole stages: 32 keys in 8 slots at D = 64, 64 keys in 6 slots on the
    wgmma path at D = 128; more stages than slots), each list with a few private rows too; every block checked on
    its own against the reference."""
    Ls = [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 95, 191, 192, 193, 230, 257, 300, 383, 384, 385, 449, 500]
    base, K, private = 768, 512, 4
    gen = torch.Generator().manual_seed(0)
    lists = []
    for j, L in enumerate(Ls):
        common = torch.randperm(base, generator=gen)[:L]
        for i in range(16):
            t = base + 16 * j + i
            own = base + torch.randperm(t - base + 1, generator=gen)[:private]
            rows = torch.cat([common, own]).unique()  # sorted
            lists.append(torch.cat([rows, rows.new_full((K - rows.numel(),), -1)]))
    idx = torch.cat([causal_indices([base], K), torch.stack(lists).int().to(DEV)])
    T = idx.shape[0]
    q, k, v, cu = inputs([T], 32, 4, D)
    poison_next_alloc(q.numel() * 2)
    o, lse = keye.ops.sparse_attention(q, k, v, idx, cu)
    o_ref, lse_ref = ref.sparse_attention(q.float(), k.float(), v.float(), idx, cu)
    for j, L in enumerate(Ls):
        rows = slice(base + 16 * j, base + 16 * (j + 1))
        assert rel_err(o[rows], o_ref[rows]) < O_RTOL, L
        assert (lse[rows] - lse_ref[rows]).abs().max() < LSE_ATOL, L


def test_block_and_pair_kernels_agree():
    """Same lists through the block kernel and the pair kernel: sorted overlapping lists (realistic: large common
    sets), lists with repeated rows (uniform draws with replacement: not strictly sorted, so no common set)."""
    from keye.bench.sparse_attention import realistic_indices, uniform_indices

    T = 5000
    q, k, v, _ = inputs([T], 32, 4, 128)
    for make in (realistic_indices, uniform_indices):
        idx = make(T, 2048, DEV)
        poison_next_alloc(q.numel() * 2)
        o_block, l_block = _fwd(q, k, v, idx, True)
        o_pair, l_pair = _fwd(q, k, v, idx, False)
        assert rel_err(o_block, o_pair.float()) < 4e-3, make.__name__
        assert (l_block - l_pair).abs().max() < 1e-4, make.__name__
        sel = torch.randint(0, T, (64,), device=DEV)
        o_ref, l_ref = ref.attend(q[sel].float(), k.float(), v.float(), idx[sel], 128 ** -0.5)
        assert rel_err(o_block[sel], o_ref) < O_RTOL and (l_block[sel] - l_ref).abs().max() < LSE_ATOL


SEEN_LO, SEEN_HI, ROW_MASK = 1 << 30, 1 << 29, (1 << 29) - 1


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("rise", [0.02, 0.5])
def test_forward_scores_rising_along_the_keys(D, rise):
    """Scores that climb with the key position (rise: log2 units per position), so every row's running max moves
    all along its list: slower than the kernels' max slack at 0.02 (~1.3 per 64-key stage: P grows past 1 between
    moves of the reference max) and past it at every stage at 0.5. Block kernel (common and private rows) and pair
    kernel against the fp32 reference."""
    from keye.bench.sparse_attention import realistic_indices

    T = 4096
    q, k, v, cu = inputs([T], 32, 4, D)
    u = F.normalize(torch.randn(D, device=DEV), dim=0)
    slope = rise / (4.0 * D ** -0.5 * 1.4426950408889634)  # q . u = 4: score = rise * position (log2 units)
    q = (q.float() * 0.02 + 4.0 * u).to(torch.bfloat16)
    k = (k.float() * 0.02 + (torch.arange(T, device=DEV) * slope)[:, None, None] * u).to(torch.bfloat16)
    idx = realistic_indices(T, 2048, DEV)
    o_ref, lse_ref = ref.sparse_attention(q.float(), k.float(), v.float(), idx, cu)
    for share_blocks in (True, False):
        poison_next_alloc(q.numel() * 2)
        o, lse = _fwd(q, k, v, idx, share_blocks)
        assert rel_err(o, o_ref) < O_RTOL, share_blocks
        # lse reaches ~0.35 T here: fp32 scores carry a relative error of a few 1e-7
        assert ((lse - lse_ref).abs() <= LSE_ATOL + 1e-5 * lse_ref.abs()).all(), share_blocks


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("scale", [-0.2, 0.0, 0.3])
def test_forward_explicit_scales(D, scale):
    """A scale other than D^-0.5: negative (the block kernel folds its sign into Q), zero (uniform weights over the
    selected keys), larger; block kernel (realistic lists: common and private rows) and pair kernel."""
    from keye.bench.sparse_attention import realistic_indices

    T = 3000
    q, k, v, cu = inputs([T], 32, 4, D)
    idx = realistic_indices(T, 2048, DEV)
    o_ref, lse_ref = ref.sparse_attention(q.float(), k.float(), v.float(), idx, cu, scale=scale)
    for share_blocks in (True, False):
        poison_next_alloc(q.numel() * 2)
        o, lse = _fwd(q, k, v, idx, share_blocks, scale)
        assert rel_err(o, o_ref) < O_RTOL, share_blocks
        assert (lse - lse_ref).abs().max() < LSE_ATOL, share_blocks


def block_plan_spec(idx, row_base, num_rows):
    """The block plan (csrc/sparse_attention/block_plan.h) in Python: per block of 16 queries the rows all of them
    selected when every list is sorted (valid rows strictly increasing, empty slots last), and per query pair the
    other rows, query a's n-th in slot 32 (n // 16) + n % 16, query b's 16 slots later, -1 padded."""
    N, K = idx.shape
    lists = []
    for q, row in enumerate(idx.tolist()):
        base = 0 if row_base is None else int(row_base[q])
        lists.append([base + x if x >= 0 and base + x < num_rows else -1 for x in row])
    blocks = (N + 15) // 16
    common, pairs = [], []
    for b in range(blocks):
        ls = lists[16 * b:16 * b + 16]
        valid = [[r for r in l if r >= 0] for l in ls]
        ordered = all(l[:len(v)] == v and v == sorted(set(v)) for l, v in zip(ls, valid))
        com = sorted(set.intersection(*map(set, valid))) if ordered else []
        common.append(com)
        in_common = set(com)
        rest = [[r for r in v if r not in in_common] for v in valid] + [[]] * (16 - len(ls))
        for w in range(8):
            a, c = rest[2 * w], rest[2 * w + 1]
            slots = 16 * ((max(len(a), len(c)) + 15) // 16)
            work = [-1] * (2 * slots)
            for n, r in enumerate(a):
                work[32 * (n // 16) + n % 16] = r | SEEN_LO
            for n, r in enumerate(c):
                work[32 * (n // 16) + 16 + n % 16] = r | SEEN_HI
            pairs.append(work)
    return common, pairs


def check_block_plan(idx, row_base, num_rows):
    common, common_len, pair_work, pair_len = torch.ops.keye.sparse_attention_block_plan(idx, row_base, num_rows)
    exp_common, exp_pairs = block_plan_spec(idx.cpu(), None if row_base is None else row_base.cpu(), num_rows)
    assert common_len.tolist() == [len(c) for c in exp_common]
    for b, c in enumerate(exp_common):
        assert common[b, :len(c)].tolist() == [r | SEEN_LO | SEEN_HI for r in c], b
    assert pair_len.tolist() == [len(w) for w in exp_pairs]
    for p, w in enumerate(exp_pairs):
        assert pair_work[p, :len(w)].tolist() == w, p
    return sum(map(len, exp_common))


def test_block_plan_matches_its_specification():
    """The plan kernel's common sets and pair lists exactly: realistic lists (large common sets), the same in rows that
    are not 16-byte aligned, varlen causal lists through row_base with a block of identical lists, an empty query
    and a tail block, rows past num_rows (empty slots), lists with repeated rows (no common set)."""
    from keye.bench.sparse_attention import realistic_indices, uniform_indices

    T = 3000
    assert check_block_plan(realistic_indices(T, 2048, DEV), None, T) > 100 * 1024
    lengths = [37, 1000, 61]
    idx = causal_indices(lengths, 256)
    idx[48:64] = idx[48]
    idx[100] = -1
    cu = torch.tensor([0, 37, 1037, 1098], device=DEV)
    row_base = torch.repeat_interleave(cu[:-1], torch.tensor(lengths, device=DEV)).int()
    assert check_block_plan(idx, row_base, 1098) > 16 * 10
    assert check_block_plan(idx, row_base, 600) > 0  # rows 600+ become empty slots (at the ends of sorted lists)
    for T, K in ((5, 8), (17, 2048), (40, 1)):
        check_block_plan(causal_indices([T], K), None, T)
    # 2048 slots in rows that are not 16-byte aligned (row stride 2049): the K = 2048 kernel's 4-byte staging copies.
    padded = torch.full((2500, 2049), -1, dtype=torch.int32, device=DEV)
    padded[:, 1:] = realistic_indices(2500, 2048, DEV)
    assert check_block_plan(padded[:, 1:], None, 2500) > 100 * 1024
    assert check_block_plan(uniform_indices(2500, 2048, DEV)[2048:], None, 2500) == 0  # repeats: not sorted
    with pytest.raises(ValueError, match="slots per query"):
        torch.ops.keye.sparse_attention_block_plan(idx.new_zeros(4, 2049), None, 10)


def test_block_plan_over_several_count_windows():
    """The plan kernel counts rows in windows of 2^17 rows: lists reaching 400K rows with common rows at the window
    edges (blocks 0 and 1); a first list with nothing in rows 10-299999, so a whole window is skipped while the other
    lists hold rows there (the tail block of 8 queries); a slot count that is not a multiple of 4 (4-byte staging
    copies; the other plan tests take the 16-byte path). Checked exactly against the specification."""
    g = torch.Generator().manual_seed(7)
    N, K, S = 40, 302, 400_000
    edges, far = [0, 3, 131071, 131072, 131073, 262143, 262144, 399999], [0, 3, 300000, 300001, 399999]
    lists = []
    for q in range(N):
        own = torch.randint(0, S, (K - 20,), generator=g).tolist()
        if q == 32:
            own = [r for r in own if r < 10 or r >= 300_000]
        rows = sorted(set((edges if q < 32 else far) + own))
        lists.append(rows + [-1] * (K - len(rows)))
    idx = torch.tensor(lists, dtype=torch.int32, device=DEV)
    assert check_block_plan(idx, None, S) >= 2 * len(edges) + len(far)
    assert check_block_plan(idx, None, 262_144) >= 2 * 6 + 2  # rows past num_rows become empty slots


def test_forward_large_topk_uses_splits():
    lengths, K = [6000], 5000  # more slots than one CTA stages (2048): split and merged by lse
    q, k, v, cu = inputs(lengths, 8, 1, 128)
    check_forward(q, k, v, causal_indices(lengths, K), cu)


def test_splits_agree():
    lengths, K = [3000], 2048
    q, k, v, cu = inputs(lengths, 32, 4, 128)
    idx = causal_indices(lengths, K)
    o1, l1 = keye.ops.sparse_attention(q, k, v, idx, cu, splits=1)
    for splits in (2, 5, 32):
        o, l = keye.ops.sparse_attention(q, k, v, idx, cu, splits=splits)
        assert rel_err(o, o1.float()) < 4e-3 and (l - l1).abs().max() < 1e-4


def test_deterministic():
    q, k, v, cu = inputs([4000], 32, 4, 128)
    idx = causal_indices([4000], 2048)
    o1, l1 = keye.ops.sparse_attention(q, k, v, idx, cu)
    o2, l2 = keye.ops.sparse_attention(q, k, v, idx, cu)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_dense_fast_path_equals_sdpa():
    """Sequences no longer than k with every earlier position selected: dense causal attention."""
    L, K, Hq, Hkv, D = 1500, 2048, 32, 4, 128
    q, k, v, cu = inputs([L], Hq, Hkv, D)
    pos = torch.arange(K, device=DEV).expand(L, K)
    idx = torch.where(pos <= torch.arange(L, device=DEV)[:, None], pos, -1).int()
    o, _ = keye.ops.sparse_attention(q, k, v, idx, cu)
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    assert rel_err(o, sdpa.float()) < O_RTOL


@pytest.mark.parametrize("page", [1, 64])
@pytest.mark.parametrize("B,n", [(1, 1), (5, 1), (3, 4)])
def test_decode_paged(page, B, n):
    Hq, Hkv, D, K = 32, 4, 128, 2048
    pages = 9000 // page
    kc = torch.randn(pages, page, Hkv, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(B, n, Hq, D, device=DEV, dtype=torch.bfloat16)
    slots = torch.stack([torch.randperm(pages * page, device=DEV)[:K] for _ in range(B * n)]).view(B, n, K).int()
    slots[0, 0, 1000:] = -1
    o, lse = keye.ops.sparse_attention_decode(q, kc, vc, slots)
    with keye.ops.force_reference():
        o_ref, lse_ref = keye.ops.sparse_attention_decode(q.float(), kc.float(), vc.float(), slots)
    assert rel_err(o, o_ref) < O_RTOL and (lse - lse_ref).abs().max() < LSE_ATOL


@pytest.mark.parametrize("Hq,Hkv,D,B", [(16, 4, 64, 3), (32, 4, 128, 40), (64, 4, 128, 2), (8, 1, 128, 200)])
def test_decode_kernel_shapes(Hq, Hkv, D, B):
    """Every decode launch shape: the own-heads kernel (G <= 8) with 8 warps (grid within one CTA per SM) and with 4
    (B = 40 x 4 KV heads and B = 200 exceed the SMs), at G = 4 / D = 64 and G = 8; the pair kernel for G = 16."""
    K, slots_total = 2048, 9000
    kc = torch.randn(slots_total // 64, 64, Hkv, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(B, 1, Hq, D, device=DEV, dtype=torch.bfloat16)
    n = slots_total // 64 * 64
    slots = torch.stack([torch.randperm(n, device=DEV)[:K] for _ in range(B)]).view(B, 1, K).int()
    slots[0, 0, 777:] = -1  # a short list: tiles past it are empty for some warps
    o, lse = keye.ops.sparse_attention_decode(q, kc, vc, slots)
    with keye.ops.force_reference():
        o_ref, lse_ref = keye.ops.sparse_attention_decode(q.float(), kc.float(), vc.float(), slots)
    assert rel_err(o, o_ref) < O_RTOL and (lse - lse_ref).abs().max() < LSE_ATOL


def test_decode_cuda_graph():
    Hq, Hkv, D, K, B = 32, 4, 128, 2048, 4
    kc = torch.randn(200, 64, Hkv, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(B, 1, Hq, D, device=DEV, dtype=torch.bfloat16)
    slots = torch.randint(-1, 200 * 64, (B, 1, K), device=DEV, dtype=torch.int32)
    with keye.ops.index_checks(False):
        keye.ops.sparse_attention_decode(q, kc, vc, slots)  # warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o, lse = keye.ops.sparse_attention_decode(q, kc, vc, slots)
    q.copy_(torch.randn_like(q))
    slots.copy_(torch.randint(-1, 200 * 64, slots.shape, device=DEV, dtype=torch.int32))
    graph.replay()
    o_ref, lse_ref = keye.ops.sparse_attention_decode(q, kc, vc, slots)
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)


def _grads(fn, xs, do, dlse):
    xs = [x.detach().requires_grad_() for x in xs]
    o, lse = fn(*xs)
    ((o.float() * do.float()).sum() + (lse.nan_to_num(neginf=0) * dlse).sum()).backward()
    return [x.grad for x in xs]


@pytest.mark.parametrize("case", ["pairs", "shared", "single_query_per_cta", "d64", "splits", "unsorted"])
def test_gradients_against_fp64_reference(case):
    from keye.bench.sparse_attention import realistic_indices

    Hq, Hkv, D, lengths, K = 32, 4, 128, [300, 151], 64
    if case == "single_query_per_cta":
        Hq, Hkv = 16, 1
    elif case == "d64":
        D = 64
    elif case == "splits":
        lengths, K = [2600], 2600
    elif case == "shared":
        lengths, K = [2600], 2048
    q, k, v, cu = inputs(lengths, Hq, Hkv, D)
    idx = realistic_indices(lengths[0], K, DEV) if case == "shared" else causal_indices(lengths, K, fill=0.8)
    if case == "unsorted":
        idx = idx.gather(1, torch.rand(idx.shape, device=DEV).argsort(dim=1))
    idx[5] = -1  # a query without keys: zero gradient
    do = torch.randn_like(q)
    dlse = torch.randn(q.shape[:2], device=DEV)
    fn = lambda a, b, c: keye.ops.sparse_attention(a, b, c, idx, cu)  # noqa: E731
    got = _grads(fn, (q, k, v), do, dlse)
    want = _grads(lambda a, b, c: ref.sparse_attention(a, b, c, idx, cu), (x.double() for x in (q, k, v)), do, dlse)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, w) < 2e-2
    assert torch.equal(got[0][5], torch.zeros_like(got[0][5]))
    unused = torch.ones(q.shape[0], dtype=torch.bool, device=DEV)
    starts = ref.sequence_starts(cu, q.shape[0])
    rows = torch.where(idx >= 0, idx + starts[:, None], -1)
    unused[rows[rows >= 0].long()] = False
    assert not got[1][unused].any() and not got[2][unused].any()  # rows nobody selected get exactly zero


def _bwd(q, k, v, idx, row_base, o, lse, do, dlse, share_blocks):
    """The fast-mode backward op alone (block kernel or pair kernel), fp32 gradients."""
    delta = (do.float() * o.float()).sum(-1) - dlse
    dq, dk, dv = torch.zeros(q.shape, device=DEV), torch.zeros(k.shape, device=DEV), torch.zeros(k.shape, device=DEV)
    torch.ops.keye.sparse_attention_bwd(q, k, v, do, idx, row_base, lse, delta, q.shape[-1] ** -0.5, 1, dq, dk, dv,
                                        share_blocks)
    return dq, dk, dv


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(32, 4), (8, 4), (4, 4)])
def test_block_backward_matches_pair_backward_and_reference(D, Hq, Hkv):
    """The 16-query block backward (common rows' dK/dV summed over the block in one product, rest per pair) against
    the pair kernel and the fp64 reference: realistic lists (large common sets), a block of identical lists
    (everything common), blocks straddling sequence boundaries, a query without keys, a tail block of 6 queries."""
    from keye.bench.sparse_attention import realistic_indices

    for lengths, make in (([1500], "realistic"), ([37, 1000, 61], "causal")):
        q, k, v, cu = inputs(lengths, Hq, Hkv, D)
        T = sum(lengths)
        if make == "realistic":
            idx = realistic_indices(T, 512, DEV)
            row_base = torch.zeros(T, dtype=torch.int32, device=DEV)
        else:
            idx = causal_indices(lengths, 256)
            idx[48:64] = idx[48]
            row_base = ref.sequence_starts(cu, T).int()
        idx[100] = -1
        o, lse = torch.ops.keye.sparse_attention_fwd(q, k, v, idx, row_base, D ** -0.5, 1, True, True)
        do, dlse = torch.randn_like(q), torch.randn(q.shape[:2], device=DEV)
        blocks = _bwd(q, k, v, idx, row_base, o, lse, do, dlse, True)
        pairs = _bwd(q, k, v, idx, row_base, o, lse, do, dlse, False)
        rows = torch.where(idx >= 0, idx + row_base[:, None], -1)
        want = _grads(lambda a, b, c: ref.attend(a, b, c, rows, D ** -0.5), (x.double() for x in (q, k, v)), do, dlse)
        for name, b, p_, w in zip(("dq", "dk", "dv"), blocks, pairs, want):
            assert torch.isfinite(b).all(), (make, name)
            assert rel_err(b, p_) < 1e-3, (make, name)  # same math, different fp32 summation order
            assert rel_err(b, w) < 2e-2, (make, name)
        assert torch.equal(blocks[0][100], torch.zeros_like(blocks[0][100]))


def _bwd_fixed(q, k, v, idx, row_base, o, lse, do, dlse, share_blocks):
    """The deterministic-mode backward op alone: int64 fixed-point accumulators, returned unscaled in fp32."""
    from keye.ops.sparse_attention import fixed_point_scales

    delta = (do.float() * o.float()).sum(-1) - dlse
    fixed, unscale = fixed_point_scales(q, k, v, do, delta, q.shape[-1] ** -0.5, idx.shape[1])
    acc = [torch.zeros(t.shape, dtype=torch.int64, device=DEV) for t in (q, k, k)]
    torch.ops.keye.sparse_attention_bwd(q, k, v, do, idx, row_base, lse, delta, q.shape[-1] ** -0.5, 1, *acc,
                                        share_blocks, fixed)
    return tuple(a.double() * u.double() for a, u in zip(acc, unscale))


@pytest.mark.parametrize("share_blocks", [True, False])
def test_fixed_point_backward_is_reproducible_and_as_precise_as_fp32(share_blocks):
    """Deterministic mode of both backward kernels: bitwise identical over runs on lists that make every CTA add
    into the same dK/dV rows (every query selects the first 256 positions: maximal atomic contention) and on
    realistic lists; within 1e-5 of the fp32 fast mode (the fixed-point rounding is far below fp32's)."""
    from keye.bench.sparse_attention import realistic_indices

    T = 2500
    q, k, v, _ = inputs([T], 32, 4, 128)
    pos = torch.arange(256, device=DEV).expand(T, 256)
    shared = torch.where(pos <= torch.arange(T, device=DEV)[:, None], pos, -1).int()
    row_base = torch.zeros(T, dtype=torch.int32, device=DEV)
    for idx in (shared, realistic_indices(T, 512, DEV)):
        o, lse = torch.ops.keye.sparse_attention_fwd(q, k, v, idx, row_base, 128 ** -0.5, 1, True, True)
        do, dlse = torch.randn_like(q), torch.randn(q.shape[:2], device=DEV)
        runs = [_bwd_fixed(q, k, v, idx, row_base, o, lse, do, dlse, share_blocks) for _ in range(3)]
        fast = _bwd(q, k, v, idx, row_base, o, lse, do, dlse, share_blocks)
        for name, a, b, c, f in zip(("dq", "dk", "dv"), *runs, fast):
            assert torch.equal(a, b) and torch.equal(a, c), name
            assert rel_err(a, f.double()) < 1e-5, name


def test_deterministic_mode_backward(monkeypatch):
    """torch.use_deterministic_algorithms(True): the fixed-point kernels, identical run to run, close to the fp64
    reference and the fast mode; a NaN in the output gradient makes every gradient NaN (not wrapped integers)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses deterministic mode without it
    lengths = [700, 41]
    q, k, v, cu = inputs(lengths, 32, 4, 128)
    idx = causal_indices(lengths, 256)
    do, dlse = torch.randn_like(q), torch.randn(q.shape[:2], device=DEV)
    fn = lambda a, b, c: keye.ops.sparse_attention(a, b, c, idx, cu)  # noqa: E731
    fast = _grads(fn, (q, k, v), do, dlse)
    want = _grads(lambda a, b, c: ref.sparse_attention(a, b, c, idx, cu), (x.double() for x in (q, k, v)), do, dlse)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det1 = _grads(fn, (q, k, v), do, dlse)
        det2 = _grads(fn, (q, k, v), do, dlse)
        bad = do.clone()
        bad[3, 0, 0] = float("nan")
        nan_grads = _grads(fn, (q, k, v), bad, dlse)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b, c, w in zip(det1, det2, fast, want):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, b)
        assert rel_err(a, w) < 2e-2
        assert rel_err(c, a.float()) < 2e-3  # both bf16 roundings of nearly the same fp32 values
    for g in nan_grads:
        assert torch.isnan(g).all()


def test_opcheck_cuda():
    lengths, K = [70, 33], 32
    q, k, v, cu = inputs(lengths, 16, 2, 64)
    idx = causal_indices(lengths, K)
    starts = ref.sequence_starts(cu, q.shape[0])
    for x in (q, k, v):
        x.requires_grad_()
    torch.library.opcheck(torch.ops.keye.sparse_attention.default, (q, k, v, idx, starts, 0.125, 1))
    torch.library.opcheck(torch.ops.keye.sparse_attention.default, (q, k, v, idx, starts, 0.125, 3))


def test_kernel_errors():
    q, k, v, cu = inputs([64], 8, 2, 128)
    idx = torch.zeros(64, 8, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="keye.sparse_attention: argument 'k' must have contiguous heads and dims"):
        torch.ops.keye.sparse_attention_fwd(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, idx, None, 0.1, 1)
    # A row stride of 2^31 elements (one row, so no storage behind it) is refused: the gathers scale it to bytes in
    # 32 bits.
    k_far = k[:1].as_strided((1, 2, 128), (2 ** 31, 128, 1))
    with pytest.raises(ValueError, match="argument 'k' must .* a row stride that is a multiple of 8 and below 2\\^31"):
        torch.ops.keye.sparse_attention_fwd(q[:1], k_far, v[:1], idx[:1] * 0, None, 0.1, 1)
    with pytest.raises(ValueError, match=r"keye.sparse_attention: argument 'indices' must hold values in \[-1, 63\]"):
        torch.ops.keye.sparse_attention_fwd(q, k, v, idx + 64, None, 0.1, 1)
    with pytest.raises(ValueError, match="head dim .* must be 64 or 128"):
        torch.ops.keye.sparse_attention_fwd(*(x[..., :32].contiguous() for x in (q, k, v)), idx, None, 0.1, 1)
    with pytest.raises(ValueError, match=r"query heads \(34\) must be a multiple of the KV heads \(2\) with at most 16"):
        torch.ops.keye.sparse_attention_fwd(torch.randn(64, 34, 128, device=DEV, dtype=torch.bfloat16), k, v, idx,
                                            None, 0.1, 1)
    # Backward accumulators: fp32 in fast mode, int64 with fixed_scale (the deterministic mode), never mixed.
    o, lse = torch.ops.keye.sparse_attention_fwd(q, k, v, idx, None, 0.1, 1)
    delta = torch.zeros_like(lse)
    grads = lambda dtype: [torch.zeros(t.shape, dtype=dtype, device=DEV) for t in (q, k, v)]  # noqa: E731
    scales = torch.ones(3, device=DEV)
    with pytest.raises(ValueError, match="sparse_attention_backward: argument 'dq' must have dtype float32, got int64"):
        torch.ops.keye.sparse_attention_bwd(q, k, v, o, idx, None, lse, delta, 0.1, 1, *grads(torch.int64))
    with pytest.raises(ValueError, match="sparse_attention_backward: argument 'dq' must have dtype int64, got float32"):
        torch.ops.keye.sparse_attention_bwd(q, k, v, o, idx, None, lse, delta, 0.1, 1, *grads(torch.float32), True,
                                            scales)
    with pytest.raises(ValueError, match=r"argument 'fixed_scale' must have shape \[3\], got \[2\]"):
        torch.ops.keye.sparse_attention_bwd(q, k, v, o, idx, None, lse, delta, 0.1, 1, *grads(torch.int64), True,
                                            scales[:2])
