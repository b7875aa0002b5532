"""The MoE permutation references (keye.ops.reference) against the element-by-element spec, on CPU."""

import random

import pytest
import torch

from keye.ops import reference as ref
from spec_moe import permute as spec_permute
from spec_moe import random_topk_ids
from spec_moe import route as spec_route
from spec_moe import unpermute as spec_unpermute
from conftest import RTOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("T", [0, 1, 2, 37, 300])
@pytest.mark.parametrize("K,E", [(1, 1), (2, 3), (8, 16), (8, 128), (4, 2)])
@pytest.mark.parametrize("align", [1, 8, 128])
def test_route_matches_spec(T, K, E, align):
    ids = random_topk_ids(T, K, E, unrouted=random.choice([0.0, 0.2]), dtype=random.choice([torch.int32, torch.int64]))
    got = ref.moe_route(ids, E, align)
    dest, src, offsets = spec_route(ids, E, align)
    assert torch.equal(got.dest, dest) and torch.equal(got.src, src) and torch.equal(got.offsets, offsets)
    assert got.dest.dtype == got.src.dtype == got.offsets.dtype == torch.int32
    assert int(offsets[-1]) % align == 0 and torch.all(offsets.diff() % align == 0)


def test_route_all_unrouted_and_single_expert():
    ids = torch.full((5, 2), -1, dtype=torch.int32)
    r = ref.moe_route(ids, 4, 1)
    assert torch.all(r.dest == -1) and torch.all(r.src == -1) and torch.all(r.offsets == 0)
    ids = torch.zeros(7, 3, dtype=torch.int64)
    r = ref.moe_route(ids, 1, 4)
    assert r.offsets.tolist() == [0, 24] and torch.equal(r.src[:21], torch.arange(21, dtype=torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("align", [1, 16])
def test_permute_matches_spec(dtype, with_scale, align):
    T, K, E, H = random.randint(1, 40), 4, 6, random.choice([8, 13, 64])
    ids = random_topk_ids(T, K, E, unrouted=0.15)
    r = ref.moe_route(ids, E, align)
    x = torch.randn(T, H).to(dtype)
    scale = torch.rand(T, K) if with_scale else None
    out = ref.moe_permute(x, r.dest, r.src, scale)
    assert out.shape == (r.src.numel(), H) and out.dtype == dtype
    assert torch.equal(out, spec_permute(x, r.dest, r.src.numel(), scale))  # copies/one rounding: exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weights", [False, True])
def test_unpermute_matches_spec(dtype, with_weights):
    T, K, E, H = random.randint(1, 40), 8, 16, random.choice([8, 24, 128])
    ids = random_topk_ids(T, K, E, unrouted=0.15)
    r = ref.moe_route(ids, E, 8)
    y = torch.randn(r.src.numel(), H).to(dtype)
    w = torch.rand(T, K).to(random.choice(DTYPES)) if with_weights else None
    out = ref.moe_unpermute(y, r.dest, w)
    assert out.shape == (T, H) and out.dtype == dtype
    assert rel_err(out, spec_unpermute(y, r.dest, w)) < RTOL[dtype]


def test_unrouted_slot_ignores_nonfinite_rows():
    y = torch.tensor([[float("inf"), float("nan")], [1.0, 2.0]])
    dest = torch.tensor([[-1, 1]], dtype=torch.int32)
    assert torch.equal(ref.moe_unpermute(y, dest, torch.tensor([[0.5, 2.0]])), torch.tensor([[2.0, 4.0]]))


def test_permute_then_unpermute_round_trip():
    T, K, E, H = 50, 8, 32, 16
    r = ref.moe_route(random_topk_ids(T, K, E, unrouted=0.0), E, 8)
    x = torch.randn(T, H)
    w = torch.softmax(torch.randn(T, K), -1)  # weights summing to one give x back
    assert rel_err(ref.moe_unpermute(ref.moe_permute(x, r.dest, r.src), r.dest, w), x) < 1e-6


def test_reference_gradients():
    """Autograd through the references equals the analytic gradients of the spec."""
    T, K, E, H = 20, 4, 8, 12
    r = ref.moe_route(random_topk_ids(T, K, E, unrouted=0.2), E, 4)
    x = torch.randn(T, H, dtype=torch.float32, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    g = torch.randn(T, H)
    out = ref.moe_unpermute(ref.moe_permute(x, r.dest, r.src), r.dest, w)
    (out * g).sum().backward()
    routed = (r.dest >= 0).float()
    assert rel_err(x.grad, (w * routed).sum(1, keepdim=True).detach() * g) < 1e-6
    assert rel_err(w.grad, routed * (g @ x.detach().T).diagonal().unsqueeze(1)) < 1e-5


def test_reference_runs_at_scale_on_cpu():
    """Qwen3-30B-A3B routing at 4K tokens: the reference is usable as a CPU fallback."""
    T, K, E, H = 4096, 8, 128, 256
    ids = random_topk_ids(T, K, E, unrouted=0.0)
    r = ref.moe_route(ids, E, 8)
    x = torch.randn(T, H, dtype=torch.bfloat16)
    w = torch.softmax(torch.randn(T, K), -1)
    out = ref.moe_unpermute(ref.moe_permute(x, r.dest, r.src), r.dest, w)
    assert rel_err(out, x) < RTOL[torch.bfloat16]
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    starts = r.offsets[:-1].long()
    # every row of an expert's segment holds a slot routed to that expert, in slot order
    for e in random.sample(range(E), 8):
        rows = r.src[starts[e]: starts[e] + counts[e]].long()
        assert torch.all(ids.reshape(-1)[rows] == e) and torch.all(rows.diff() > 0)


def test_slot_dot_in_token_chunks_equals_one_pass():
    """The chunked per-slot dot products (routing-weight gradients) do not depend on the chunk size."""
    T, K, E, H = 37, 4, 8, 12
    r = ref.moe_route(random_topk_ids(T, K, E, unrouted=0.2), E, 1)
    rows, tokens = torch.randn(r.src.numel(), H), torch.randn(T, H)
    want = torch.where(r.dest >= 0, (rows[r.dest.long().clamp(min=0)].double() * tokens.double().unsqueeze(1)).sum(-1),
                       0.0)
    for chunk in (K * H, 5 * K * H, 1 << 26):  # 1 token, 5 tokens, everything per chunk
        got = ref.moe_slot_dot(rows, r.dest, tokens, chunk_elems=chunk)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
