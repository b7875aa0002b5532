"""CUDA kernels of the MoE permutation against the references (GPU only; skipped without one)."""

import random

import pytest
import torch

from keye import ops
from keye.ops import reference as ref
from conftest import RTOL, poison_next_alloc, rel_err
from spec_moe import random_topk_ids

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
POISON_INT = 0x7F  # int32 0x7F7F7F7F: not a legal row/slot, unlike -1


def _route_both(ids, E, align):
    poison_next_alloc(ids.numel() * 4, byte=POISON_INT)
    got = torch.ops.keye.moe_route(ids, E, align)
    want = ref.moe_route(ids, E, align)
    return got, want


@pytest.mark.parametrize("T", [0, 1, 5, 127, 1000, 4099, 20000])
@pytest.mark.parametrize("K,E", [(1, 1), (2, 7), (8, 128), (6, 64), (8, 1024)])
@pytest.mark.parametrize("align", [1, 8, 128])
def test_route_equals_reference(T, K, E, align):
    ids = random_topk_ids(T, K, E, unrouted=random.choice([0.0, 0.05]), device="cuda",
                          dtype=random.choice([torch.int32, torch.int64]), skew=random.random() < 0.5)
    got, want = _route_both(ids, E, align)
    for name, g, w in zip(("dest", "src", "offsets"), got, want):
        assert g.dtype == torch.int32 and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name} differs at {(g != w).nonzero()[:5].tolist()}"


def test_route_all_to_one_expert_and_all_unrouted():
    T, K = 30000, 8  # 240K slots in one expert: many chunks contribute to the same segment
    ids = torch.full((T, K), 5, dtype=torch.int32, device="cuda")
    got, want = _route_both(ids, 16, 8)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    ids = torch.full((777, 3), -1, dtype=torch.int64, device="cuda")
    got, want = _route_both(ids, 16, 8)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("H", [2048, 768, 13, 4])
def test_permute_equals_reference(dtype, with_scale, H):
    T, K, E, align = random.choice([1, 33, 3000]), 8, 128, random.choice([1, 8])
    r = ref.moe_route(random_topk_ids(T, K, E, unrouted=0.05, device="cuda"), E, align)
    x = torch.randn(T, H, device="cuda").to(dtype)
    scale = torch.rand(T, K, device="cuda").to(random.choice(DTYPES)) if with_scale else None
    poison_next_alloc(r.src.numel() * H * x.element_size())
    out = torch.ops.keye.moe_permute(x, r.dest, r.src, scale)
    assert torch.equal(out, ref.moe_permute(x, r.dest, r.src, scale))  # copies / one rounding: bit-exact


def test_permute_strided_rows():
    """x as a column slice of a wider buffer (row stride != H): vector and scalar paths both exact."""
    T, K, E = 500, 8, 128
    r = ref.moe_route(random_topk_ids(T, K, E, device="cuda"), E, 1)
    wide = torch.randn(T, 3000, device="cuda", dtype=torch.bfloat16)
    for x in (wide[:, 8:2056], wide[:, 3:2051]):  # 16-byte aligned rows, then misaligned
        poison_next_alloc(r.src.numel() * 2048 * 2)
        assert torch.equal(torch.ops.keye.moe_permute(x, r.dest, r.src, None), ref.moe_permute(x, r.dest, r.src))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("H", [2048, 13])
def test_unpermute_matches_reference(dtype, with_weights, H):
    T, K, E = random.choice([1, 64, 4000]), 8, 128
    r = ref.moe_route(random_topk_ids(T, K, E, unrouted=0.05, device="cuda"), E, 8)
    y = torch.randn(r.src.numel(), H, device="cuda").to(dtype)
    w = torch.rand(T, K, device="cuda").to(random.choice(DTYPES)) if with_weights else None
    poison_next_alloc(T * H * y.element_size())
    out = torch.ops.keye.moe_unpermute(y, r.dest, w)
    want = ref.moe_unpermute(y.float(), r.dest, w)  # same fp32 sum; only the order of additions differs
    assert rel_err(out, want) < RTOL[dtype]


def test_unpermute_is_deterministic():
    T, K, E = 4096, 8, 128
    r = ops.moe_route(random_topk_ids(T, K, E, device="cuda"), E, 8)
    y = torch.randn(r.src.numel(), 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, K, device="cuda")
    a = torch.ops.keye.moe_unpermute(y, r.dest, w)
    assert all(torch.equal(a, torch.ops.keye.moe_unpermute(y, r.dest, w)) for _ in range(3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [2048, 7168, 13])
@pytest.mark.parametrize("K", [1, 6, 8, 200])
def test_slot_dot_matches_reference(dtype, H, K):
    T, E = random.choice([1, 37, 3000 if K <= 8 else 50]), 128
    r = ref.moe_route(random_topk_ids(T, K, E, unrouted=0.1, device="cuda"), E, random.choice([1, 8]))
    rows = torch.randn(r.src.numel(), H, device="cuda").to(dtype)
    tokens = torch.randn(T, H, device="cuda").to(dtype)
    poison_next_alloc(T * K * 4)
    got = torch.ops.keye.moe_slot_dot(rows, r.dest, tokens)
    want = ref.moe_slot_dot(rows.float(), r.dest, tokens.float()).double()
    assert got.dtype == torch.float32 and got.shape == (T, K)
    assert torch.all(got[r.dest < 0] == 0)
    # both sum H products in fp32 (different orders): error ~ log2(H) * 2^-24 of the sum of |terms|
    bound = ref.moe_slot_dot(rows.float().abs(), r.dest, tokens.float().abs()).double()
    assert torch.all((got.double() - want).abs() <= 1e-5 * bound + 1e-30)


def test_slot_dot_strided_and_deterministic():
    T, K, E = 2000, 8, 128
    r = ops.moe_route(random_topk_ids(T, K, E, device="cuda"), E, 8)
    rows = torch.randn(r.src.numel(), 2048, device="cuda", dtype=torch.bfloat16)
    wide = torch.randn(T, 3000, device="cuda", dtype=torch.bfloat16)
    for tokens in (wide[:, 8:2056], wide[:, 3:2051]):  # 16-byte aligned rows (vector path), then misaligned
        got = torch.ops.keye.moe_slot_dot(rows, r.dest, tokens)
        assert torch.equal(got, torch.ops.keye.moe_slot_dot(rows, r.dest, tokens))
        want = ref.moe_slot_dot(rows.float(), r.dest, tokens.float())
        assert rel_err(got, want) < 1e-5


def test_slot_dot_errors_name_the_argument():
    r = ops.moe_route(random_topk_ids(4, 2, 8, device="cuda"), 8, 1)
    rows = torch.randn(r.src.numel(), 16, device="cuda")
    with pytest.raises(Exception, match="tokens"):
        torch.ops.keye.moe_slot_dot(rows, r.dest, torch.randn(4, 16, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(Exception, match="tokens"):
        torch.ops.keye.moe_slot_dot(rows, r.dest, torch.randn(5, 16, device="cuda"))
    with ops.index_checks(True), pytest.raises(Exception, match="dest"):
        torch.ops.keye.moe_slot_dot(rows[:2], r.dest, torch.randn(4, 16, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_matches_reference(dtype):
    """Registered backward formulas (kernels) vs autograd through the references."""
    T, K, E, H = 700, 8, 64, 256
    r = ops.moe_route(random_topk_ids(T, K, E, unrouted=0.05, device="cuda"), E, 8)
    x0 = torch.randn(T, H, device="cuda", dtype=dtype)
    s0, w0 = torch.rand(T, K, device="cuda"), torch.rand(T, K, device="cuda")
    g = torch.randn(T, H, device="cuda", dtype=dtype)
    grads = []
    for force in (False, True):
        x, s, w = (t.clone().requires_grad_() for t in (x0, s0, w0))
        if force:
            with ops.force_reference():
                out = ops.moe_unpermute(torch.sin(ops.moe_permute(x, r.dest, r.src, s)), r.dest, w)
        else:
            out = ops.moe_unpermute(torch.sin(ops.moe_permute(x, r.dest, r.src, s)), r.dest, w)
        (out.float() * g.float()).sum().backward()
        grads.append((x.grad, s.grad, w.grad))
    for got, want in zip(*grads):
        assert rel_err(got, want) < 4 * RTOL[dtype]


def test_opcheck_cuda():
    T, K, E, H = 64, 4, 16, 32
    ids = random_topk_ids(T, K, E, device="cuda")
    r = ops.moe_route(ids, E, 8)
    x = torch.randn(T, H, device="cuda", requires_grad=True)
    y = torch.randn(r.src.numel(), H, device="cuda", requires_grad=True)
    w = torch.rand(T, K, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.keye.moe_route.default, (ids, E, 8))
    torch.library.opcheck(torch.ops.keye.moe_permute.default, (x, r.dest, r.src, w))
    torch.library.opcheck(torch.ops.keye.moe_unpermute.default, (y, r.dest, w))
    torch.library.opcheck(torch.ops.keye.moe_slot_dot.default, (y.detach(), r.dest, x.detach()))


def test_torch_compile_fullgraph():
    T, K, E, H = 256, 8, 128, 512
    ids = random_topk_ids(T, K, E, device="cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, K, device="cuda")

    def moe_shuffle(x, ids, w):
        r = torch.ops.keye.moe_route(ids, E, 8)
        return torch.ops.keye.moe_unpermute(torch.ops.keye.moe_permute(x, r[0], r[1], None) * 2, r[0], w)

    with ops.index_checks(False):  # the checks sync with the host, which would break the graph
        got = torch.compile(moe_shuffle, fullgraph=True)(x, ids, w)
    assert rel_err(got, moe_shuffle(x, ids, w)) < RTOL[torch.bfloat16]


def test_cuda_graph_capture():
    """No host sync inside the ops (index checks are skipped while capturing)."""
    T, K, E, H = 1024, 8, 128, 1024
    ids = random_topk_ids(T, K, E, device="cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, K, device="cuda")
    run = lambda: ops.moe_unpermute(ops.moe_permute(x, *ops.moe_route(ids, E, 8)[:2]), ops.moe_route(ids, E, 8).dest, w)
    eager = run()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    ids.copy_(random_topk_ids(T, K, E, device="cuda"))  # new routing, replayed without re-capture
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, run()) < RTOL[torch.bfloat16]
    assert not torch.equal(out, eager)
