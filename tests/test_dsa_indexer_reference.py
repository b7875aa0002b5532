"""DSA lightning indexer references (keye.ops.reference.dsa_indexer*) against brute-force restatements, CPU; and the
indexer losses of keye.ops (keye/ops/dsa_indexer_loss.py, pure PyTorch) against the same restatements and the
reference."""

import itertools
import math
import random

import pytest
import torch

import keye.ops.dsa_indexer as rules
from keye.ops.reference import dsa_indexer as dsa
from keye.ops.reference.dsa_indexer_loss import indexer_loss
from keye.ops.dsa_indexer_loss import indexer_loss as fast_loss
from conftest import rel_err


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def make_inputs(T, H, D, dtype=torch.float32):
    q, k, w = torch.randn(T, H, D, dtype=dtype), torch.randn(T, D, dtype=dtype), torch.randn(T, H)
    q8, qs = dsa.indexer_rotate_quantize(q)
    k8, ks = dsa.indexer_rotate_quantize(k)
    return q8, qs, w, k8, ks


def brute_scores(q8, qs, w, k8, ks):
    """I[t, s] by the formula, element by element over heads, in float64."""
    T, H, D = q8.shape
    out = torch.zeros(T, k8.shape[0], dtype=torch.float64)
    for h in range(H):
        dots = (q8[:, h].double() @ k8.double().T).clamp_min(0)
        out += (w[:, h].double() * D ** -0.5 * qs[:, h].double()).unsqueeze(1) * dots
    return out * ks.double().unsqueeze(0)


def brute_select(scores_row, n_visible, topk):
    order = sorted(sorted(range(n_visible), key=lambda s: (-scores_row[s], s))[:topk])
    return order + [-1] * (topk - len(order))


@pytest.mark.parametrize("n", [32, 64, 128])
def test_hadamard_is_orthonormal_sylvester(n):
    x = torch.randn(5, 3, n)
    assert rel_err(dsa.hadamard_transform(x), x.double() @ sylvester(n)) < 1e-6
    y = torch.randn(n)
    assert abs(float(dsa.hadamard_transform(x[0, 0]) @ dsa.hadamard_transform(y)) - float(x[0, 0] @ y)) < 1e-3


def test_quantize_ue8m0_scales_and_error():
    x = torch.randn(200, 16, 64) * torch.rand(200, 16, 1) * 100
    x[3, 2] = 0.0
    x8, s = dsa.quantize_fp8_ue8m0(x)
    assert x8.dtype == torch.float8_e4m3fn and s.shape == (200, 16)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    amax = x.abs().amax(-1).clamp_min(1e-4)
    assert torch.all(amax / s <= 448) and torch.all(amax / s > 224)  # rounded up, by less than 2x
    deq = x8.float() * s.unsqueeze(-1)
    assert rel_err(deq, x) < 0.04  # e4m3 keeps 3 mantissa bits
    assert float(s[3, 2]) == 2.0 ** math.ceil(math.log2(1e-4 / 448))


def test_ue8m0_scale_rounds_up_exactly():
    # amax / 448 = 2^-3 * (1 + 2^-23): fp32 log2 rounds this to -3 exactly; the scale must still be 2^-2.
    amax = torch.tensor(448 * 2.0 ** -3, dtype=torch.float32).nextafter(torch.tensor(1e9)).item()
    x = torch.zeros(1, 32)
    x[0, 0] = amax
    _, s = dsa.quantize_fp8_ue8m0(x)
    assert float(s[0]) == 2.0 ** -2


def test_nan_scores_count_as_minus_infinity():
    s = torch.tensor([[1.0, float("nan"), float("-inf"), 0.5]])
    idx, sc = dsa.select_topk(s, torch.tensor([4]), 3)
    assert idx.tolist() == [[0, 1, 3]] and sc[0, 1] == float("-inf")  # NaN ties -inf, lower column first


@pytest.mark.parametrize("H,D", list(itertools.product(dsa.HEADS, dsa.HEAD_DIMS)))
def test_scores_match_formula(H, D):
    q8, qs, w, k8, ks = make_inputs(9, H, D)
    assert rel_err(dsa.indexer_scores(q8, qs, w, k8, ks), brute_scores(q8, qs, w, k8, ks)) < 1e-5


@pytest.mark.parametrize("H,D", list(itertools.product(dsa.HEADS, dsa.HEAD_DIMS)))
def test_prefill_selection_matches_brute_force(H, D):
    topk = 16
    lens = random.choice([[15], [16], [17], [5, 33, 1, 16], [40, 3]])  # T < k, T = k, T = k + 1, odd packs
    cu = torch.tensor([0] + list(itertools.accumulate(lens)))
    q8, qs, w, k8, ks = make_inputs(int(cu[-1]), H, D)
    idx, sc = dsa.indexer_topk_prefill(q8, qs, w, k8, ks, cu, topk, return_scores=True,
                                       max_chunk_bytes=random.choice([1, 1 << 30]))
    packed = dsa.indexer_topk_prefill(q8, qs, w, k8, ks, cu, topk, packed=True)
    for s0, s1 in zip(cu[:-1].tolist(), cu[1:].tolist()):
        full = dsa.indexer_scores(q8[s0:s1], qs[s0:s1], w[s0:s1], k8[s0:s1], ks[s0:s1])
        for t in range(s0, s1):
            want = brute_select(full[t - s0].tolist(), t - s0 + 1, topk)
            assert idx[t].tolist() == want
            assert packed[t].tolist() == [v + s0 if v >= 0 else -1 for v in want]
            got_sc = [v for v in sc[t].tolist()]
            assert got_sc == [full[t - s0, v].item() if v >= 0 else float("-inf") for v in want]


def test_ties_go_to_lower_positions():
    q8, qs, w, k8, ks = make_inputs(40, 4, 32)
    w.zero_()  # every score is exactly 0
    idx = dsa.indexer_topk_prefill(q8, qs, w, k8, ks, torch.tensor([0, 40]), 8)
    assert idx[39].tolist() == list(range(8)) and idx[2].tolist() == [0, 1, 2] + [-1] * 5


def test_decode_matches_prefill_and_physical_slots():
    H, D, topk, n = 16, 64, 32, 3
    lens = [70, 5, 130]
    pages_per_seq = [math.ceil(L / 64) for L in lens]
    num_pages = sum(pages_per_seq) + 2
    perm = torch.randperm(num_pages).int()  # pages scattered through the cache
    block_table = torch.zeros(len(lens), max(pages_per_seq), dtype=torch.int32)
    k_cache = torch.zeros(num_pages, 64, D, dtype=torch.float8_e4m3fn)
    k_scale_cache = torch.zeros(num_pages, 64)
    used = 0
    seqs = []
    for b, L in enumerate(lens):
        block_table[b, : pages_per_seq[b]] = perm[used: used + pages_per_seq[b]]
        used += pages_per_seq[b]
        q8, qs, w, k8, ks = make_inputs(L, H, D)
        slots = block_table[b].long()[torch.arange(L) // 64] * 64 + torch.arange(L) % 64
        dsa.indexer_cache_append(k8, ks, k_cache, k_scale_cache, slots)
        seqs.append((q8, qs, w, k8, ks))
    q8d = torch.stack([s[0][L - n: L] for s, L in zip(seqs, lens)])
    qsd = torch.stack([s[1][L - n: L] for s, L in zip(seqs, lens)])
    wd = torch.stack([s[2][L - n: L] for s, L in zip(seqs, lens)])
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    got = dsa.indexer_topk_decode(q8d, qsd, wd, k_cache, k_scale_cache, block_table, seq_lens, topk)
    phys = dsa.indexer_topk_decode(q8d, qsd, wd, k_cache, k_scale_cache, block_table, seq_lens, topk, physical=True)
    for b, ((q8, qs, w, k8, ks), L) in enumerate(zip(seqs, lens)):
        want = dsa.indexer_topk_prefill(q8, qs, w, k8, ks, torch.tensor([0, L]), topk)[L - n:]
        assert torch.equal(got[b], want)
        pos = got[b].long()
        slot = torch.where(pos >= 0, block_table[b].long()[pos.clamp(min=0) // 64] * 64 + pos.clamp(min=0) % 64, -1)
        assert torch.equal(phys[b].long(), slot)


def test_cache_append_skips_padding_slots():
    k_cache = torch.zeros(2, 64, 32, dtype=torch.float8_e4m3fn)
    k_scale_cache = torch.full((2, 64), -7.0)
    k8, ks = dsa.indexer_rotate_quantize(torch.randn(3, 32))
    dsa.indexer_cache_append(k8, ks, k_cache, k_scale_cache, torch.tensor([70, -1, 5]))
    assert torch.equal(k_cache[1, 6].view(torch.uint8), k8[0].view(torch.uint8)) and float(k_scale_cache[0, 5]) == float(ks[2])
    assert int((k_scale_cache == -7.0).sum()) == 126


# ---- losses -------------------------------------------------------------------------------------

def brute_loss(q, w, k, qm, km, cu, indices=None):
    """Whole-matrix restatement, one sequence and one group at a time, float64."""
    total = torch.zeros((), dtype=torch.float64)
    G, Hq, D = km.shape[1], qm.shape[1], q.shape[-1]
    for s0, s1 in zip(cu[:-1].tolist(), cu[1:].tolist()):
        L = s1 - s0
        I = torch.einsum("th,ths->ts", w[s0:s1].double() * D ** -0.5,
                         torch.einsum("thd,sd->ths", q[s0:s1].double(), k[s0:s1].double()).relu())
        allowed = torch.ones(L, L, dtype=torch.bool).tril()
        if indices is not None:
            sel = torch.zeros(L, L, dtype=torch.bool)
            for t in range(L):
                for v in indices[s0 + t].tolist():
                    if v >= 0:
                        sel[t, v] = True
            allowed = sel
        logq = torch.log_softmax(I.masked_fill(~allowed, float("-inf")), -1)
        for g in range(G):
            p = 0
            for h in range(g * Hq // G, (g + 1) * Hq // G):
                s = qm[s0:s1, h].double() @ km[s0:s1, g].double().T * qm.shape[-1] ** -0.5
                p = p + torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
            p = p / (Hq // G)
            total += torch.where(p > 0, p * (p.clamp_min(1e-300).log() - logq), 0.0).sum()
    return total


LOSSES = {"reference": indexer_loss, "keye": fast_loss}


@pytest.mark.parametrize("impl", LOSSES)
@pytest.mark.parametrize("sparse", [False, True])
def test_loss_and_gradients_match_brute_force(sparse, impl):
    cu = torch.tensor([0, 19, 20, 57])
    T, H, D = 57, 8, 32
    q, w, k = torch.randn(T, H, D), torch.randn(T, H), torch.randn(T, D)
    qm, km = torch.randn(T, 8, 16), torch.randn(T, 2, 16)
    indices = None
    if sparse:
        q8, qs = dsa.indexer_rotate_quantize(q)
        k8, ks = dsa.indexer_rotate_quantize(k)
        indices = dsa.indexer_topk_prefill(q8, qs, w, k8, ks, cu, 8)
    grads = []
    chunk = random.choice([1, 3000, 1 << 30])  # one row, a few rows, whole sequences per chunk
    for f in (lambda *a: LOSSES[impl](*a, indices=indices, max_chunk_bytes=chunk),
              lambda *a: brute_loss(*a, indices=indices)):
        qq, ww, kk = (t.clone().requires_grad_() for t in (q, w, k))
        loss = f(qq, ww, kk, qm, km, cu)
        loss.backward()
        grads.append((loss.detach(), qq.grad, ww.grad, kk.grad))
    for got, want in zip(*grads):
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("impl", LOSSES)
def test_sparse_loss_with_every_key_selected_equals_dense(impl):
    cu = torch.tensor([0, 30])
    q, w, k = torch.randn(30, 4, 32), torch.randn(30, 4), torch.randn(30, 32)
    qm, km = torch.randn(30, 4, 8), torch.randn(30, 1, 8)
    allk = torch.arange(32).expand(30, 32).clone()
    allk[allk > torch.arange(30).unsqueeze(1)] = -1
    allk = allk[:, torch.randperm(32)]  # in no particular order, -1 anywhere
    dense = LOSSES[impl](q, w, k, qm, km, cu)
    assert rel_err(LOSSES[impl](q, w, k, qm, km, cu, indices=allk.int()), dense) < 1e-5


@pytest.mark.parametrize("impl", LOSSES)
def test_loss_is_zero_when_indexer_matches_uniform_target(impl):
    q, k = torch.randn(25, 4, 32), torch.randn(25, 32)
    loss = LOSSES[impl](q, torch.zeros(25, 4), k, torch.zeros(25, 4, 8), torch.randn(25, 2, 8), torch.tensor([0, 25]))
    assert abs(float(loss)) < 1e-5


def loss_and_grads(f, q, w, k, qm, km, cu, indices, **kw):
    qq, ww, kk = (t.clone().requires_grad_() for t in (q, w, k))
    loss = f(qq, ww, kk, qm, km, cu, indices, **kw)
    loss.backward()
    return [loss.detach()] + [t.grad for t in (qq, ww, kk)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keye_loss_matches_reference(dtype):
    """Several sequences of odd lengths, selections with empty (-1) slots and a row with none at all, random chunk
    sizes; gradients come back in the inputs' dtype."""
    T, H, D = 150, 4, 64
    cu = torch.tensor([0, 1, 40, 41, 150])
    q, w, k = torch.randn(T, H, D), torch.randn(T, H), torch.randn(T, D)
    qm, km = torch.randn(T, 12, 16), torch.randn(T, 3, 16)
    q8, qs = dsa.indexer_rotate_quantize(q)
    k8, ks = dsa.indexer_rotate_quantize(k)
    sel = dsa.indexer_topk_prefill(q8, qs, w, k8, ks, cu, 16)
    sel[100] = -1  # a row that selects nothing: no loss, no gradient
    sel[120, 3] = sel[120, 0]  # a position listed twice counts twice (as in the reference)
    q, w, k, qm, km = (t.to(dtype) for t in (q, w, k, qm, km))
    for indices in (None, sel):
        want = loss_and_grads(indexer_loss, q, w, k, qm, km, cu, indices)
        chunk = random.choice([1, 20000, 1 << 30])
        got = loss_and_grads(fast_loss, q, w, k, qm, km, cu, indices, max_chunk_bytes=chunk)
        assert [g.dtype for g in got[1:]] == [dtype] * 3
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: both round their gradients to bf16 (2^-9)
        for a, b in zip(got, want):
            assert rel_err(a.float(), b.float()) < tol
        if indices is not None:
            assert float(got[1][100].abs().sum()) == 0 and float(got[2][100].abs().sum()) == 0


@pytest.mark.parametrize("gather_from", [0, 3, 10 ** 6])
def test_keye_sparse_loss_paths_agree(gather_from, monkeypatch):
    """Every row on the gathered path, a mix, every row on the prefix path: the same loss and gradients."""
    import keye.ops.dsa_indexer_loss as fast
    monkeypatch.setattr(fast, "GATHER_FROM_PREFIX", gather_from)
    T, cu = 90, torch.tensor([0, 33, 90])
    q, w, k = torch.randn(T, 4, 32), torch.randn(T, 4), torch.randn(T, 32)
    qm, km = torch.randn(T, 8, 16), torch.randn(T, 2, 16)
    q8, qs = dsa.indexer_rotate_quantize(q)
    k8, ks = dsa.indexer_rotate_quantize(k)
    sel = dsa.indexer_topk_prefill(q8, qs, w, k8, ks, cu, 8)
    want = loss_and_grads(indexer_loss, q, w, k, qm, km, cu, sel)
    got = loss_and_grads(fast_loss, q, w, k, qm, km, cu, sel, max_chunk_bytes=random.choice([1, 1 << 30]))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_keye_loss_without_gradients_and_scaled_backward():
    T = 40
    q, w, k = torch.randn(T, 4, 32), torch.randn(T, 4), torch.randn(T, 32)
    qm, km = torch.randn(T, 4, 8), torch.randn(T, 2, 8)
    cu = torch.tensor([0, T])
    with torch.no_grad():
        assert rel_err(fast_loss(q, w, k, qm, km, cu), indexer_loss(q, w, k, qm, km, cu)) < 1e-6
    qq = q.clone().requires_grad_()  # gradient for q only
    (3.0 * fast_loss(qq, w, k, qm, km, cu)).backward()
    q2 = q.clone().requires_grad_()
    (3.0 * indexer_loss(q2, w, k, qm, km, cu)).backward()
    assert rel_err(qq.grad, q2.grad) < 1e-5


@pytest.mark.parametrize("call,pattern", [
    (lambda: dsa.indexer_topk_prefill(*make_inputs(4, 16, 64)[:3], torch.randn(4, 64), make_inputs(4, 16, 64)[4],
                                      torch.tensor([0, 4]), 8), r"'k8' must have dtype float8_e4m3fn"),
    (lambda: dsa.indexer_topk_prefill(*make_inputs(4, 16, 64), torch.tensor([0, 3]), 8), r"'cu_seqlens' must start at 0"),
    (lambda: dsa.indexer_topk_prefill(*make_inputs(4, 16, 64), torch.tensor([0, 4]), 0), r"'topk' must be an int"),
    (lambda: dsa.indexer_rotate_quantize(torch.randn(4, 48)), r"D_I \(x.size\(-1\)\) must be one of"),
    (lambda: dsa.indexer_cache_append(*dsa.indexer_rotate_quantize(torch.randn(2, 32)),
                                      torch.zeros(1, 64, 32, dtype=torch.float8_e4m3fn), torch.zeros(1, 64),
                                      torch.tensor([3, 64])), r"'slot_mapping' must hold values in \[-1, 63\]"),
    (lambda: indexer_loss(torch.randn(5, 4, 32), torch.randn(5, 4), torch.randn(5, 32), torch.randn(5, 6, 8),
                          torch.randn(5, 4, 8), torch.tensor([0, 5])), r"must be a multiple of the KV heads"),
    (lambda: fast_loss(torch.randn(5, 4, 32), torch.randn(5, 4), torch.randn(5, 32), torch.randn(5, 6, 8),
                       torch.randn(5, 4, 8), torch.tensor([0, 5])), r"must be a multiple of the KV heads"),
    (lambda: fast_loss(torch.randn(5, 4, 32), torch.randn(5, 4), torch.randn(5, 32), torch.randn(5, 4, 8),
                       torch.randn(5, 2, 8), torch.tensor([0, 5]), torch.tensor([[0], [1], [3], [0], [0]])),
     r"'indices' row 2 points outside \[-1, 2\]"),
    (lambda: indexer_loss(torch.randn(6, 4, 32), torch.randn(6, 4), torch.randn(6, 32), torch.randn(6, 4, 8),
                          torch.randn(6, 2, 8), torch.tensor([0, 2, 6]), torch.tensor([[0], [1], [0], [-2], [0], [0]])),
     r"'indices' row 3 points outside \[-1, 1\]"),
    (lambda: fast_loss(torch.randn(5, 4, 32), torch.randn(5, 3), torch.randn(5, 32), torch.randn(5, 4, 8),
                       torch.randn(5, 2, 8), torch.tensor([0, 5])), r"'w'"),
])
def test_bad_arguments(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reference_runs_on_cuda_like_on_cpu():
    """The references are also the GPU fallback (and what kernels are checked against there)."""
    cu = torch.tensor([0, 300, 1000])
    q, k, w = torch.randn(1000, 16, 64), torch.randn(1000, 64), torch.randn(1000, 16)
    q8, qs = dsa.indexer_rotate_quantize(q)
    k8, ks = dsa.indexer_rotate_quantize(k)
    cpu = dsa.indexer_topk_prefill(q8, qs, w, k8, ks, cu, 256)
    q8c, qsc = dsa.indexer_rotate_quantize(q.cuda())
    k8c, ksc = dsa.indexer_rotate_quantize(k.cuda())
    assert torch.equal(q8c.view(torch.uint8).cpu(), q8.view(torch.uint8)) and torch.equal(qsc.cpu(), qs)
    gpu = dsa.indexer_topk_prefill(q8c, qsc, w.cuda(), k8c, ksc, cu.cuda(), 256)
    assert torch.equal(gpu.cpu(), cpu)
    qm, km = torch.randn(1000, 32, 128), torch.randn(1000, 4, 128)
    for indices in (None, cpu):
        a = indexer_loss(q, w, k, qm, km, cu, indices=indices)
        b = indexer_loss(q.cuda(), w.cuda(), k.cuda(), qm.cuda(), km.cuda(), cu.cuda(),
                         indices=None if indices is None else indices.cuda())
        assert rel_err(b.cpu(), a) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keye_loss_on_cuda_matches_reference(dtype):
    """Keye shapes (16 x 64 indexer, 32 / 4 x 128 main); bf16 runs the score GEMMs in TF32 (exact for bf16)."""
    cu = torch.tensor([0, 700, 3000], device="cuda")
    T = 3000
    q, k, w = torch.randn(T, 16, 64), torch.randn(T, 64), torch.randn(T, 16)
    q8, qs = dsa.indexer_rotate_quantize(q)
    k8, ks = dsa.indexer_rotate_quantize(k)
    sel = dsa.indexer_topk_prefill(q8.cuda(), qs.cuda(), w.cuda(), k8.cuda(), ks.cuda(), cu, 512)
    q, k, w = (t.cuda().to(dtype) for t in (q, k, w))
    qm, km = torch.randn(T, 32, 128, device="cuda", dtype=dtype), torch.randn(T, 4, 128, device="cuda", dtype=dtype)
    for indices in (None, sel):
        want = loss_and_grads(indexer_loss, q, w, k, qm, km, cu, indices)
        got = loss_and_grads(fast_loss, q, w, k, qm, km, cu, indices, max_chunk_bytes=random.choice([1 << 24, 1 << 31]))
        for a, b in zip(got, want):
            assert rel_err(a.float(), b.float()) < (1e-4 if dtype == torch.float32 else 2e-2)


def test_reference_gradients_do_not_depend_on_chunking_in_bf16():
    """The reference accumulates the chunks' gradients in fp32 and rounds to the inputs' dtype once: with bf16
    leaves autograd used to sum k's gradient in bf16, one rounding per chunk (8e-3 off with ~100 chunks here)."""
    T = 700
    q, k, w = torch.randn(T, 16, 64), torch.randn(T, 64), torch.randn(T, 16)
    qm, km = torch.randn(T, 32, 128, dtype=torch.bfloat16), torch.randn(T, 4, 128, dtype=torch.bfloat16)
    cu = torch.tensor([0, T])
    args = [t.to(torch.bfloat16) for t in (q, w, k)]
    one = loss_and_grads(indexer_loss, *args, qm, km, cu, None)
    many = loss_and_grads(indexer_loss, *args, qm, km, cu, None, max_chunk_bytes=1 << 20)  # ~100 chunks
    for a, b in zip(many, one):
        assert rel_err(a.float(), b.float()) < 1e-3


def test_decode_selection_rules_at_their_measured_edges():
    """Which decode top-k path keye.ops.indexer_topk_decode takes (a host-side rule, no GPU needed), at the edges the
    H200 measurements set (keye/ops/dsa_indexer.py): candidate lists up to 2^21 keys in all at 128K keys per row, up
    to LISTS_WIDE_MAX_ROWS rows past that, never past LISTS_MAX_COLS keys, below 32 keys per selected key or for
    more than 16 (query, head) columns per sequence; group maxima from 64 rows."""
    lists, group_max = rules.decode_uses_lists, rules.decode_uses_group_max
    assert lists(16, 1, 16, 131072, 2048) and not lists(17, 1, 16, 131072, 2048)
    assert lists(32, 1, 16, 65536, 2048) and not lists(33, 1, 16, 65536, 2048)
    assert lists(rules.LISTS_WIDE_MAX_ROWS, 1, 16, 262144, 2048)
    assert not lists(rules.LISTS_WIDE_MAX_ROWS + 1, 1, 16, 262144, 2048)
    assert lists(rules.LISTS_WIDE_MAX_ROWS, 1, 16, 131072 + 64, 2048)
    assert not lists(1, 1, 16, rules.LISTS_MAX_COLS + 64, 2048)
    assert not lists(1, 1, 16, 32 * 2048 - 64, 2048) and lists(1, 1, 16, 32 * 2048, 2048)
    assert not lists(1, 2, 16, 131072, 2048) and lists(1, 2, 8, 131072, 2048)
    assert group_max(64, 1, 16, 131072, 2048) and not group_max(63, 1, 16, 131072, 2048)
