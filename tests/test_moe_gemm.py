"""Expert GEMMs over expert-grouped rows: the reference against float64 restatements (CPU), and keye's CUDA
kernels (CUTLASS grouped GEMMs, SwiGLU, decode GEMVs) against the reference (GPU): every compiled tile
configuration, empty experts, one expert with every row, R = 1, sizes off every tile, rows no expert owns."""

import pytest
import torch
import torch.nn.functional as F

from keye import ops
from keye.ops.reference import moe_gemm as spec
from conftest import poison_next_alloc, rel_err
from spec_moe import random_topk_ids


def random_offsets(R, E, empty=0.3, tail=0, device="cpu", one_expert=None):
    """Non-decreasing [E + 1] int32 offsets over R - tail rows; about `empty` of the experts get no rows."""
    used = R - tail
    if one_expert is not None:
        counts = torch.zeros(E, dtype=torch.long)
        counts[one_expert] = used
    else:
        w = torch.rand(E) * (torch.rand(E) >= empty)
        if w.sum() == 0:
            w[0] = 1.0
        counts = torch.distributions.Multinomial(used, w / w.sum()).sample().long() if used > 0 else torch.zeros(E, dtype=torch.long)
    off = torch.zeros(E + 1, dtype=torch.int32)
    off[1:] = counts.cumsum(0)
    return off.to(device)


def loop_grouped(a, b, offsets, trans_b=False):
    out = torch.zeros(a.shape[0], b.shape[1] if trans_b else b.shape[2], dtype=torch.float64)
    o = offsets.tolist()
    for e in range(len(o) - 1):
        for r in range(o[e], o[e + 1]):
            w = b[e].double()
            out[r] = a[r].double() @ (w.T if trans_b else w)
    return out


# --- reference (CPU) --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trans_b", [False, True])
def test_reference_grouped_mm_matches_row_loop(trans_b):
    R, E, K, N = 37, 6, 12, 10
    a = torch.randn(R, K)
    b = torch.randn(E, N, K) if trans_b else torch.randn(E, K, N)
    off = random_offsets(R, E, tail=3)
    got = spec.moe_grouped_mm(a, b, off, trans_b)
    assert rel_err(got, loop_grouped(a, b, off, trans_b)) < 1e-6
    assert (got[int(off[-1]):] == 0).all()


def test_reference_wgrad_matches_sum_of_outer_products():
    R, E, M, N = 29, 5, 7, 9
    a, dy = torch.randn(R, M), torch.randn(R, N)
    off = random_offsets(R, E, empty=0.4)
    got = spec.moe_grouped_mm_wgrad(a, dy, off)
    o = off.tolist()
    for e in range(E):
        want = torch.zeros(M, N, dtype=torch.float64)
        for r in range(o[e], o[e + 1]):
            want += torch.outer(a[r].double(), dy[r].double())
        assert torch.allclose(got[e].double(), want, rtol=1e-5, atol=1e-5)


def test_reference_swiglu_backward_is_the_gradient():
    h = torch.randn(5, 16, dtype=torch.float64)
    d = torch.randn(5, 8, dtype=torch.float64)
    hh = h.clone().requires_grad_()
    (F.silu(hh[:, :8]) * hh[:, 8:] * d).sum().backward()
    assert torch.allclose(spec.moe_swiglu_backward(h.float(), d.float()).double(), hh.grad, rtol=1e-5, atol=1e-6)
    a = torch.full((5, 8), float("nan"))
    with torch.no_grad():  # the layer's backward runs without grad mode
        spec.moe_swiglu_backward(h.float(), d.float(), a)
    assert torch.allclose(a.double(), F.silu(h[:, :8]) * h[:, 8:], rtol=1e-6, atol=1e-7)


def test_reference_decode_is_the_layer_without_grouping():
    T, K, E, H, I = 5, 3, 4, 16, 8
    x = torch.randn(T, H)
    ids = random_topk_ids(T, K, E, unrouted=0.2)
    ids[1] = torch.tensor([2, 2, -1])  # a token may name an expert twice: two slots
    weights = torch.rand(T, K)
    w1, w2 = torch.randn(E, H, 2 * I), torch.randn(E, I, H)
    a = spec.moe_decode_gate_up(x, ids, w1)
    want_a = torch.zeros(T * K, I, dtype=torch.float64)
    for s, e in enumerate(ids.reshape(-1).tolist()):
        if e >= 0:
            h = x[s // K].double() @ w1[e].double()
            want_a[s] = F.silu(h[:I]) * h[I:]
    assert rel_err(a, want_a) < 1e-5  # norm-wise: elementwise fp32 tolerances fail where terms cancel
    out = spec.moe_decode_down(a, ids, weights, w2)
    assert rel_err(out, ops.reference.moe(x, weights, ids, w1, w2)) < 1e-5


def test_reference_decode_validation():
    x, w1, w2 = torch.randn(2, 16), torch.randn(4, 16, 16), torch.randn(4, 8, 16)
    ids = torch.tensor([[0, 1], [3, -1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"moe_decode_gate_up: argument 'ids' must hold values in \[-1, 3\]"):
        spec.moe_decode_gate_up(x, ids + 1, w1)
    a = spec.moe_decode_gate_up(x, ids, w1)
    with pytest.raises(ValueError, match=r"moe_decode_down: top_k \* I must be at most 16384"):
        spec.moe_decode_down(torch.zeros(2 * 9, 2048), torch.zeros(2, 9, dtype=torch.int32), torch.rand(2, 9),
                             torch.randn(1, 2048, 16))
    with pytest.raises(ValueError, match=r"moe_decode_down: argument 'weights' must have dtype float32"):
        spec.moe_decode_down(a, ids, torch.rand(2, 2, dtype=torch.float64), w2)
    with pytest.raises(ValueError, match=r"moe_decode_down: argument 'a' has size 2 in dim 0 but T \* top_k"):
        spec.moe_decode_down(a[:2], ids, torch.rand(2, 2), w2)


def test_reference_fused_decode_is_the_layer_for_one_token():
    K, E, H, I = 4, 6, 16, 8
    x = torch.randn(1, H)
    ids = torch.tensor([[2, -1, 5, 2]], dtype=torch.int32)  # an unrouted slot, and one expert named twice
    weights = torch.rand(1, K)
    w1, w2 = torch.randn(E, H, 2 * I), torch.randn(E, I, H)
    got = spec.moe_decode(x, ids, weights, w1, w2)
    want = torch.zeros(H, dtype=torch.float64)
    for k, e in enumerate(ids[0].tolist()):
        if e >= 0:
            h = x[0].double() @ w1[e].double()
            want += weights[0, k].double() * ((F.silu(h[:I]) * h[I:]) @ w2[e].double())
    assert got.shape == (1, H) and rel_err(got, want) < 1e-5
    assert rel_err(got, ops.reference.moe(x, weights, ids, w1, w2)) < 1e-5


def test_fused_decode_dispatch_by_shape_and_weight_bytes():
    assert not spec.decode_fused_preferred(1, 8, 2048, 768)       # Keye: 75 MB of routed weights, two kernels
    assert spec.decode_fused_preferred(1, 8, 2048, 1408)          # 138 MB
    assert not spec.decode_fused_preferred(2, 8, 2048, 1408)      # one token only
    assert not spec.decode_fused_preferred(1, 8, 7168, 2048)      # H past 4096
    assert not spec.decode_fused_supported(1, 8, 2048, 20)        # I not a multiple of 8
    assert spec.decode_fused_supported(1, 8, 2048, 768)


def test_reference_fused_decode_validation():
    x, w1, w2 = torch.randn(1, 16), torch.randn(4, 16, 16), torch.randn(4, 8, 16)
    ids, weights = torch.tensor([[0, 3]], dtype=torch.int32), torch.rand(1, 2)
    with pytest.raises(ValueError, match=r"moe_decode: argument 'x' must hold one token \[1, H\], got shape \[2, 16\]"):
        spec.moe_decode(torch.randn(2, 16), ids.repeat(2, 1), weights.repeat(2, 1), w1, w2)
    with pytest.raises(ValueError, match=r"moe_decode: argument 'down' has size 12 in dim 2 but the hidden size"):
        spec.moe_decode(x, ids, weights, w1, torch.randn(4, 8, 12))
    with pytest.raises(ValueError, match=r"moe_decode: argument 'down' has size 4 in dim 1 but the activation width"):
        spec.moe_decode(x, ids, weights, w1, torch.randn(4, 4, 16))
    with pytest.raises(ValueError, match=r"moe_decode: argument 'ids' must hold values in \[-1, 3\]"):
        spec.moe_decode(x, ids + 1, weights, w1, w2)
    with pytest.raises(ValueError, match=r"moe_decode: argument 'weights' must have dtype float32"):
        spec.moe_decode(x, ids, weights.double(), w1, w2)


def test_reference_pack_gate_up_order():
    """moe_pack_gate_up's order as its docstring states it: in each 256-column tile t, packed column 8k + 2c + a is gate
    (k even) or up (k odd) column 128t + 32c + 2(k // 2) + a; unpack inverts it."""
    E, H, I = 2, 3, 384
    w = torch.randn(E, H, 2 * I)
    packed = spec.moe_pack_gate_up(w)
    for p in range(2 * I):
        t, q = divmod(p, 256)
        k, c, a = q // 8, (q % 8) // 2, q % 2
        src = (k % 2) * I + 128 * t + 32 * c + 2 * (k // 2) + a
        assert torch.equal(packed[:, :, p], w[:, :, src]), p
    assert torch.equal(spec.moe_unpack_gate_up(packed), w)
    with pytest.raises(ValueError, match=r"'gate_up' must have 2I a multiple of 256"):
        spec.moe_pack_gate_up(torch.randn(E, H, 2 * 100))


def test_reference_grouped_mm_swiglu_is_swiglu_of_the_gemm():
    R, E, K, I = 41, 5, 16, 128
    a, w = torch.randn(R, K), torch.randn(E, K, 2 * I)
    off = random_offsets(R, E, tail=3)
    got = spec.moe_grouped_mm_swiglu(a, spec.moe_pack_gate_up(w), off)
    h = loop_grouped(a, w, off)
    assert rel_err(got, F.silu(h[:, :I]) * h[:, I:]) < 1e-5
    assert (got[int(off[-1]):] == 0).all()


def test_reference_decode_takes_packed_gate_up():
    T, K, E, H, I = 3, 2, 4, 16, 128
    x, weights = torch.randn(T, H), torch.rand(T, K)
    ids = random_topk_ids(T, K, E, unrouted=0.2)
    w1, w2 = torch.randn(E, H, 2 * I), torch.randn(E, I, H)
    packed = spec.moe_pack_gate_up(w1)
    assert torch.equal(spec.moe_decode_gate_up(x, ids, packed, packed=True), spec.moe_decode_gate_up(x, ids, w1))
    assert torch.equal(spec.moe_decode(x[:1], ids[:1], weights[:1], packed, w2, gate_up_packed=True),
                       spec.moe_decode(x[:1], ids[:1], weights[:1], w1, w2))
    with pytest.raises(ValueError, match=r"moe_decode_gate_up: argument 'w' must have 2I a multiple of 256"):
        spec.moe_decode_gate_up(x, ids, w1[:, :, :192], packed=True)
    with pytest.raises(ValueError, match=r"moe_decode: argument 'gate_up' must have 2I a multiple of 256"):
        spec.moe_decode(x[:1], ids[:1], weights[:1], w1[:, :, :192], w2[:, :96], gate_up_packed=True)


def test_reference_packed_layer_is_the_layer():
    T, K, E, H, I = 9, 2, 4, 16, 128
    x, w = torch.randn(T, H), torch.rand(T, K)
    ids = random_topk_ids(T, K, E, unrouted=0.2)
    w1, w2 = torch.randn(E, H, 2 * I) * H ** -0.5, torch.randn(E, I, H) * I ** -0.5
    want = ops.reference.moe(x, w, ids, w1, w2)
    assert rel_err(ops.moe(x, w, ids, ops.moe_pack_gate_up(w1), w2, gate_up_packed=True), want) < 1e-5
    with pytest.raises(ValueError, match="gate_up_packed=True is for inference"):
        ops.moe(x.requires_grad_(), w, ids, ops.moe_pack_gate_up(w1), w2, gate_up_packed=True)
    with pytest.raises(ValueError, match=r"moe: argument 'gate_up' must have 2I a multiple of 256"):
        ops.moe(x.detach(), w, ids, w1[:, :, :192], w2[:, :96], gate_up_packed=True)


def test_reference_validation():
    a, b = torch.randn(8, 4), torch.randn(2, 4, 6)
    off = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'offsets' must have dtype int32"):
        spec.moe_grouped_mm(a, b, off.long())
    with pytest.raises(ValueError, match=r"'b' has size 4 in dim 1 but K"):
        spec.moe_grouped_mm(a[:, :3], b, off)
    with pytest.raises(ValueError, match=r"'offsets \(differences\)' must hold values"):
        spec.moe_grouped_mm(a, b, torch.tensor([0, 5, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"'offsets' must hold values in \[0, 8\]"):
        spec.moe_grouped_mm(a, b, torch.tensor([0, 3, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"'offsets' has size 3 in dim 0 but E \+ 1"):
        spec.moe_grouped_mm(a, torch.randn(3, 4, 6), off)


# --- CUDA kernels -----------------------------------------------------------------------------------------------

def bf16(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).bfloat16()


def layer_inputs(T, K, E, H, I, unrouted):
    """x, routing weights, ids, gate_up, down of one MoE layer on the GPU (bf16 weights scaled to unit outputs)."""
    x, w = bf16(T, H), torch.rand(T, K, device="cuda")
    ids = random_topk_ids(T, K, E, unrouted=unrouted, device="cuda")
    return x, w, ids, bf16(E, H, 2 * I, scale=H ** -0.5), bf16(E, I, H, scale=I ** -0.5)


CASES = [  # R, E, K, N, tail, one_expert
    (1, 4, 64, 48, 0, None),
    (517, 16, 128, 96, 5, None),
    (3000, 128, 2048, 1536, 0, None),    # Keye gate_up, ~23 rows per expert
    (4099, 128, 768, 2048, 17, None),    # Keye down
    (700, 8, 256, 136, 0, 5),            # every row on one expert
]


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_grouped_mm_every_config(case, trans_b):
    R, E, K, N, tail, one = case
    a = bf16(R, K)
    b = bf16(E, N, K, scale=K ** -0.5) if trans_b else bf16(E, K, N, scale=K ** -0.5)
    off = random_offsets(R, E, tail=tail, device="cuda", one_expert=one)
    want = spec._grouped(a.float(), b.float(), off, trans_b, "test")
    for config in list(range(len(ops.moe_grouped_gemm_configs("dgrad" if trans_b else "fwd")))) + [-1]:
        poison_next_alloc(R * N * 2)
        got = ops.moe_grouped_mm(a, b, off, trans_b=trans_b, config=config)
        assert rel_err(got, want) < 1e-2, config
        assert (got[int(off[-1]):] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("R,E,M,N,empty", [(1, 4, 64, 48, 0.0), (333, 16, 136, 64, 0.5), (4096, 128, 2048, 1536, 0.1),
                                           (8192, 128, 768, 2048, 0.0)])
def test_wgrad_every_config_deterministic(R, E, M, N, empty):
    a, dy = bf16(R, M), bf16(R, N)
    off = random_offsets(R, E, empty=empty, device="cuda")
    want = spec.moe_grouped_mm_wgrad(a.float(), dy.float(), off)
    counts = (off[1:] - off[:-1]).tolist()
    for config in list(range(len(ops.moe_grouped_gemm_configs("wgrad")))) + [-1]:
        poison_next_alloc(E * M * N * 2)
        got = ops.moe_grouped_mm_wgrad(a, dy, off, config=config)
        assert rel_err(got, want) < 1e-2, config
        for e, c in enumerate(counts):
            if c == 0:
                assert (got[e] == 0).all(), f"expert {e} has no rows but a nonzero gradient"
        assert torch.equal(got, ops.moe_grouped_mm_wgrad(a, dy, off, config=config)), "not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("R,I", [(1, 8), (1000, 768), (77, 1408)])
def test_swiglu_and_backward(R, I):
    h, d = bf16(R, 2 * I, scale=3.0), bf16(R, I)
    poison_next_alloc(R * I * 2)
    assert rel_err(ops.moe_swiglu(h), spec.moe_swiglu(h.float())) < 1e-2
    poison_next_alloc(R * 2 * I * 2)
    assert rel_err(ops.moe_swiglu_backward(h, d), spec.moe_swiglu_backward(h.float(), d.float())) < 1e-2
    a = torch.full((R, I), float("nan"), device="cuda", dtype=torch.bfloat16)
    dh = ops.moe_swiglu_backward(h, d, a)  # the same gradient, plus the forward written into a
    assert torch.equal(dh, ops.moe_swiglu_backward(h, d))
    assert rel_err(a, spec.moe_swiglu(h.float())) < 1e-2
    with pytest.raises(Exception, match="a_out"):
        ops.moe_swiglu_backward(h, d, a[:, : I // 2])


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,E,H,I,one", [(1, 8, 128, 2048, 768, False), (7, 8, 128, 2048, 768, False),
                                           (64, 8, 128, 2048, 768, False), (20, 2, 8, 64, 32, True),
                                           (3, 8, 64, 2048, 1408, False), (3, 4, 8, 256, 64, False),
                                           (2, 8, 256, 7168, 2048, False), (5, 1, 4, 4160, 96, True),
                                           (1, 3, 8, 4160, 96, False), (600, 1, 8, 64, 32, False)])
def test_decode_kernels(T, K, E, H, I, one):
    x = bf16(T, H)
    ids = random_topk_ids(T, K, E, unrouted=0.1, device="cuda")
    if one:
        ids[:, 0] = 1  # every token on expert 1: one CTA serves 20 slots in groups (weights read once per group)
    weights = torch.rand(T, K, device="cuda")
    w1, w2 = bf16(E, H, 2 * I, scale=H ** -0.5), bf16(E, I, H, scale=I ** -0.5)
    poison_next_alloc(T * K * I * 2)
    a = ops.moe_decode_gate_up(x, ids, w1)
    assert rel_err(a, spec.moe_decode_gate_up(x.float(), ids, w1.float())) < 1e-2
    assert (a.view(T, K, I)[ids < 0] == 0).all(), "unrouted slots must give zero rows"
    poison_next_alloc(T * H * 2)
    out = ops.moe_decode_down(a, ids, weights, w2)
    assert rel_err(out, spec.moe_decode_down(a.float(), ids, weights, w2.float())) < 1e-2
    assert torch.equal(out, ops.moe_decode_down(a, ids, weights, w2)), "not deterministic"
    assert torch.equal(a, ops.moe_decode_gate_up(x, ids, w1)), "not deterministic"
    if I % 128 == 0:  # packed gate_up: the same sums in the same order, at other addresses
        poison_next_alloc(T * K * I * 2)
        assert torch.equal(ops.moe_decode_gate_up(x, ids, ops.moe_pack_gate_up(w1), packed=True), a)


@pytest.mark.gpu
@pytest.mark.parametrize("I", [768, 20])
def test_decode_down_stages_unaligned_activations(I):
    """The down kernel stages a token's activation rows with 16-byte loads where every row starts 16-byte aligned,
    element by element otherwise (I not a multiple of 8, or a at an odd address): same sums in the same order."""
    T, K, E, H = 2, 8, 16, 2048
    ids = random_topk_ids(T, K, E, unrouted=0.1, device="cuda")
    weights = torch.rand(T, K, device="cuda")
    w2 = bf16(E, I, H, scale=I ** -0.5)
    a = bf16(T * K, I)
    shifted = torch.empty(T * K * I + 1, dtype=torch.bfloat16, device="cuda")[1:].view(T * K, I)  # 2 bytes off
    shifted.copy_(a)
    poison_next_alloc(T * H * 2)
    out = ops.moe_decode_down(shifted, ids, weights, w2)
    assert rel_err(out, spec.moe_decode_down(a.float(), ids, weights, w2.float())) < 1e-2
    assert torch.equal(out, ops.moe_decode_down(a, ids, weights, w2))


@pytest.mark.gpu
@pytest.mark.parametrize("K,E,H,I,unrouted", [(8, 128, 2048, 768, 0.0), (8, 128, 2048, 768, 0.3),
                                               (8, 64, 2048, 1408, 0.0), (3, 8, 256, 64, 0.0), (1, 4, 16, 8, 0.0),
                                               (5, 8, 1040, 40, 0.2), (8, 16, 4096, 96, 0.0), (2, 4, 64, 2048, 0.0),
                                               (64, 128, 64, 16, 0.1), (64, 64, 1024, 2048, 0.0)])
def test_decode_fused(K, E, H, I, unrouted):
    """One token through gate_up, SwiGLU, down and the combine in one kernel. Sizes that leave stages short of
    full (H = 1040, I = 40), the largest H and I, more CTAs than rows (H = 16), one CTA's rows spanning many routed
    slots (K = 64, I = 16) and the most down rows per CTA (64 x 2048)."""
    x = bf16(1, H)
    ids = random_topk_ids(1, K, E, unrouted=unrouted, device="cuda")
    if K >= 3:
        ids[0, 2] = ids[0, 0]  # an expert named twice: two slots, each read and added
    weights = torch.rand(1, K, device="cuda")
    w1, w2 = bf16(E, H, 2 * I, scale=H ** -0.5), bf16(E, I, H, scale=I ** -0.5)
    poison_next_alloc(H * 2)
    out = ops.moe_decode(x, ids, weights, w1, w2)
    assert out.shape == (1, H)
    assert rel_err(out, spec.moe_decode(x.float(), ids, weights, w1.float(), w2.float())) < 1e-2
    assert torch.equal(out, ops.moe_decode(x, ids, weights, w1, w2)), "not deterministic"
    if I % 128 == 0:  # packed gate_up: the same sums in the same order, at other addresses
        poison_next_alloc(H * 2)
        assert torch.equal(ops.moe_decode(x, ids, weights, ops.moe_pack_gate_up(w1), w2, gate_up_packed=True), out)


@pytest.mark.gpu
def test_decode_fused_in_cuda_graph_and_picked_by_moe():
    """The cooperative launch is captured and replayed; keye.ops.moe takes the fused kernel for a layer this large."""
    K, E, H, I = 8, 64, 2048, 1408
    assert spec.decode_fused_preferred(1, K, H, I)
    x, ids = bf16(1, H), random_topk_ids(1, K, E, unrouted=0.0, device="cuda")
    weights = torch.rand(1, K, device="cuda")
    w1, w2 = bf16(E, H, 2 * I, scale=H ** -0.5), bf16(E, I, H, scale=I ** -0.5)
    with ops.index_checks(False):
        assert torch.equal(ops.moe(x, weights, ids, w1, w2), ops.moe_decode(x, ids, weights, w1, w2))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = ops.moe_decode(x, ids, weights, w1, w2)
        x.copy_(bf16(1, H))
        g.replay()
        first = out.clone()
        g.replay()
    assert torch.equal(out, first), "a replay must give the same result"
    assert rel_err(out, spec.moe_decode(x.float(), ids, weights, w1.float(), w2.float())) < 1e-2


@pytest.mark.gpu
def test_decode_fused_unrouted_and_out_of_range_slots():
    """No routed slot: zeros (every element written). ids >= E with index checks off add nothing (as -1)."""
    K, E, H, I = 4, 8, 256, 64
    x, w1, w2 = bf16(1, H), bf16(E, H, 2 * I), bf16(E, I, H)
    weights = torch.rand(1, K, device="cuda")
    poison_next_alloc(H * 2)
    assert (ops.moe_decode(x, torch.full((1, K), -1, dtype=torch.int32, device="cuda"), weights, w1, w2) == 0).all()
    bad = torch.tensor([[1, E, 3, E + 1000]], dtype=torch.int32, device="cuda")
    with ops.index_checks(False):
        got = ops.moe_decode(x, bad, weights, w1, w2)
    assert torch.equal(got, ops.moe_decode(x, torch.where(bad >= E, -1, bad), weights, w1, w2))


@pytest.mark.gpu
def test_decode_fused_errors_name_the_argument():
    ids, weights = torch.zeros(1, 2, dtype=torch.int32, device="cuda"), torch.rand(1, 2, device="cuda")
    with pytest.raises(ValueError, match=r"moe_decode: argument 'x' must hold one token \[1, H\]"):
        torch.ops.keye.moe_decode(bf16(2, 64), ids.repeat(2, 1), weights.repeat(2, 1), bf16(2, 64, 32), bf16(2, 16, 64))
    with pytest.raises(ValueError, match=r"moe_decode: the hidden size H must be a positive multiple of 16 up to 4096"):
        torch.ops.keye.moe_decode(bf16(1, 4112), ids, weights, bf16(2, 4112, 32), bf16(2, 16, 4112))
    with pytest.raises(ValueError, match=r"moe_decode: argument 'gate_up' must have 2I columns with I a positive "
                                         r"multiple of 8"):
        torch.ops.keye.moe_decode(bf16(1, 64), ids, weights, bf16(2, 64, 40), bf16(2, 20, 64))
    with pytest.raises(ValueError, match=r"moe_decode: argument 'down' has size 3 in dim 0 but the expert count"):
        torch.ops.keye.moe_decode(bf16(1, 64), ids, weights, bf16(2, 64, 32), bf16(3, 16, 64))
    with pytest.raises(ValueError, match=r"moe_decode: argument 'weights' must have the shape of 'ids'"):
        torch.ops.keye.moe_decode(bf16(1, 64), ids, weights[:, :1], bf16(2, 64, 32), bf16(2, 16, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("R,E,K,I,tail,one", [(1, 4, 64, 128, 0, None), (517, 16, 128, 256, 5, None),
                                              (3000, 128, 2048, 768, 0, None), (20_000, 128, 2048, 768, 7, None),
                                              (700, 8, 256, 1408, 0, 5)])
def test_grouped_mm_swiglu(R, E, K, I, tail, one):
    """The SwiGLU epilogue against swiglu(fp32 GEMM), every compiled tiling: partial row tiles, empty experts, rows
    past offsets[E] zero, every row on one expert; I = 1408 is 11 tiles of 128 (an odd number of 256-column tiles,
    which a 1 x 2 cluster rounds up); an odd number of 64-row tiles for the 2 x 1 cluster; poisoned output so
    unwritten elements show."""
    a, w = bf16(R, K), bf16(E, K, 2 * I, scale=K ** -0.5)
    packed = ops.moe_pack_gate_up(w)
    off = random_offsets(R, E, tail=tail, device="cuda", one_expert=one)
    h = spec._grouped(a.float(), w.float(), off, False, "test")
    want = F.silu(h[:, :I]) * h[:, I:]
    configs = ops.moe_grouped_gemm_configs("fwd_swiglu")
    assert len(configs) >= 2
    for config in [-1, *range(len(configs))]:
        poison_next_alloc(R * I * 2)
        name = "automatic" if config < 0 else configs[config]
        got = ops.moe_grouped_mm_swiglu(a, packed, off, config)
        assert got.shape == (R, I) and not got.isnan().any(), name
        assert rel_err(got, want) < 1e-2, name
        assert (got[int(off[-1]):] == 0).all(), name
        assert torch.equal(got, ops.moe_grouped_mm_swiglu(a, packed, off, config)), f"{name}: not deterministic"
    if R < 1000:
        torch.library.opcheck(torch.ops.keye.moe_grouped_mm_swiglu.default, (a, packed, off))
    with pytest.raises(ValueError, match=r"moe_grouped_mm_swiglu: argument 'config' must be -1 \(automatic\)"):
        torch.ops.keye.moe_grouped_mm_swiglu(a, packed, off, len(configs))


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,I", [(1, 128, 768), (4, 128, 768), (1, 64, 1408), (64, 128, 768)])
def test_packed_layer_on_every_path(T, E, I):
    """keye.ops.moe over packed gate_up takes the path the checkpoint order takes: the decode kernels (T = 1, 4:
    bitwise the same as unpacked), the one-kernel decode (64 experts of I = 1408: the same), the grouped GEMMs with
    the SwiGLU epilogue (T = 64: within the bf16 rounding of h that the unpacked path adds)."""
    x, w, ids, w1, w2 = layer_inputs(T, 8, E, 2048, I, unrouted=0.05)
    with torch.no_grad():
        plain = ops.moe(x, w, ids, w1, w2)
        packed = ops.moe(x, w, ids, ops.moe_pack_gate_up(w1), w2, gate_up_packed=True)
    if T < 64:
        assert torch.equal(packed, plain)
    else:
        assert rel_err(packed, plain) < 1e-2
    assert rel_err(packed, ops.reference.moe(x.float(), w, ids, w1.float(), w2.float())) < 1e-2


@pytest.mark.gpu
def test_packed_layer_matches_the_layer_and_captures():
    x, w, ids, w1, w2 = layer_inputs(4096, 8, 128, 2048, 768, unrouted=0.05)
    packed = ops.moe_pack_gate_up(w1)
    want = ops.reference.moe(x.float(), w, ids, w1.float(), w2.float())
    with torch.no_grad():
        assert rel_err(ops.moe(x, w, ids, packed, w2, gate_up_packed=True), want) < 1e-2
        with ops.index_checks(False):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = ops.moe(x, w, ids, packed, w2, gate_up_packed=True)
            g.replay()
            first = out.clone()
            g.replay()
    assert torch.equal(out, first)
    assert rel_err(out, want) < 1e-2
    with pytest.raises(ValueError, match=r"moe_grouped_mm_swiglu: argument 'b' must have 2I a multiple of 256"):
        torch.ops.keye.moe_grouped_mm_swiglu(bf16(8, 64), bf16(2, 64, 200), torch.tensor([0, 3, 8], dtype=torch.int32,
                                                                                         device="cuda"))


@pytest.mark.gpu
def test_layer_forward_keye_shape_and_graph_capture():
    T, K, E, H, I = 4096, 8, 128, 2048, 768
    x, w, ids, w1, w2 = layer_inputs(T, K, E, H, I, unrouted=0.0)
    want = ops.reference.moe(x.float(), w, ids, w1.float(), w2.float())
    assert rel_err(ops.moe(x, w, ids, w1, w2), want) < 1e-2
    # decode kernels (1 token; 8: stream-K down with its per-tile counters) and grouped GEMMs (64, 4096), each
    # captured in a CUDA graph and replayed twice
    for t in (1, 8, 64, 4096):
        with ops.index_checks(False):
            args = (x[:t].clone(), w[:t].clone(), ids[:t].clone(), w1, w2)
            ops.moe(*args)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = ops.moe(*args)
            args[0].copy_(bf16(t, H))
            g.replay()
            first = out.clone()
            g.replay()
        assert torch.equal(out, first), "a replay must give the same result"
        assert rel_err(out, ops.reference.moe(args[0].float(), args[1], args[2], w1.float(), w2.float())) < 1e-2


@pytest.mark.gpu
def test_kernel_errors_name_the_argument():
    a, b = bf16(8, 64), bf16(2, 64, 48)
    off = torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"moe_grouped_mm: argument 'a' must have dtype bfloat16"):
        torch.ops.keye.moe_grouped_mm(a.float(), b, off)
    with pytest.raises(ValueError, match=r"moe_grouped_mm: argument 'b' has size 64 in dim 1 but K"):
        torch.ops.keye.moe_grouped_mm(a[:, :32].contiguous(), b, off)
    with pytest.raises(ValueError, match=r"'offsets \(differences\)' must hold values"):
        torch.ops.keye.moe_grouped_mm(a, b, torch.tensor([0, 5, 3], dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match=r"argument 'config' must be -1 \(automatic\) or in \[0, "):
        torch.ops.keye.moe_grouped_mm(a, b, off, False, 99)
    with pytest.raises(ValueError, match=r"multiple of 8"):
        torch.ops.keye.moe_grouped_mm(bf16(8, 60), bf16(2, 60, 48), off)
    with pytest.raises(ValueError, match=r"moe_decode_gate_up: argument 'ids' must hold values in \[-1, 1\]"):
        torch.ops.keye.moe_decode_gate_up(a, torch.full((8, 2), 2, dtype=torch.int32, device="cuda"), bf16(2, 64, 64))
    with pytest.raises(ValueError, match=r"moe_decode_down: top_k \* I must be at most 16384"):
        torch.ops.keye.moe_decode_down(bf16(18, 2048), torch.zeros(2, 9, dtype=torch.int32, device="cuda"),
                                       torch.rand(2, 9, device="cuda"), bf16(1, 2048, 64))
    with pytest.raises(ValueError, match=r"moe_decode_down: argument 'weights' must have dtype float32"):
        torch.ops.keye.moe_decode_down(bf16(16, 32), torch.zeros(8, 2, dtype=torch.int32, device="cuda"),
                                       torch.rand(8, 2, device="cuda").bfloat16(), bf16(2, 32, 64))


@pytest.mark.gpu
def test_decode_kernels_with_no_routed_slot_give_zero_rows():
    x = bf16(4, 256)
    ids = torch.full((4, 2), -1, dtype=torch.int32, device="cuda")
    w1, w2 = bf16(8, 256, 128), bf16(8, 64, 256)
    poison_next_alloc(8 * 64 * 2)
    a = ops.moe_decode_gate_up(x, ids, w1)
    poison_next_alloc(4 * 256 * 2)
    assert (a == 0).all() and (ops.moe_decode_down(a, ids, torch.rand(4, 2, device="cuda"), w2) == 0).all()


@pytest.mark.gpu
def test_decode_kernels_never_read_past_the_experts_with_checks_off():
    """ids >= E are only reported by index checks; without them the kernels treat them as unrouted (no
    out-of-bounds weight reads), so the result equals that of the same ids with those slots set to -1."""
    T, K, E, H, I = 3, 4, 8, 256, 64
    x = bf16(T, H)
    ids = random_topk_ids(T, K, E, unrouted=0.0, device="cuda")
    bad = ids.clone()
    bad[0, 1], bad[2, 3] = E, E + 1000
    unrouted = torch.where(bad >= E, -1, bad)
    weights = torch.rand(T, K, device="cuda")
    w1, w2 = bf16(E, H, 2 * I, scale=H ** -0.5), bf16(E, I, H, scale=I ** -0.5)
    with ops.index_checks(False):
        a = ops.moe_decode_gate_up(x, bad, w1)
        out = ops.moe_decode_down(a, bad, weights, w2)
    assert torch.equal(a, ops.moe_decode_gate_up(x, unrouted, w1))
    assert torch.equal(out, ops.moe_decode_down(a, unrouted, weights, w2))


@pytest.mark.gpu
def test_decode_kernels_refuse_more_slots_than_grid_rows():
    with pytest.raises(ValueError, match=r"moe_decode_gate_up: at most 65535 \(token, expert\) slots"):
        torch.ops.keye.moe_decode_gate_up(bf16(8193, 64), torch.zeros(8193, 8, dtype=torch.int32, device="cuda"),
                                          bf16(2, 64, 64))
