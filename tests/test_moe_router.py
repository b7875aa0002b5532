"""MoE router: reference against the element-wise spec and Qwen3's formulation (CPU); kernel against the
reference (GPU)."""

import random

import pytest
import torch

import keye
from keye import ops
from keye.ops import reference as ref
from keye.ops.moe_router import router_logits_grad
from conftest import RTOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def spec_router(logits, k, renormalize):
    """Token by token, expert by expert."""
    T, E = logits.shape
    ids = torch.zeros(T, k, dtype=torch.int32)
    w = torch.zeros(T, k)
    counts = torch.zeros(E, dtype=torch.int32)
    prob_sum = torch.zeros(E, dtype=torch.float64)
    for t in range(T):
        row = [float("-inf") if v != v else v for v in logits[t].float().tolist()]
        p = torch.softmax(logits[t].double(), 0)
        order = sorted(range(E), key=lambda e: (-row[e], e))[:k]
        sel = torch.tensor([float(p[e]) for e in order], dtype=torch.float64)
        if renormalize:
            sel = sel / sel.sum()
        ids[t] = torch.tensor(order)
        w[t] = sel.float()
        for e in order:
            counts[e] += 1
        prob_sum += p
    return w, ids, counts, prob_sum


@pytest.mark.parametrize("E,k", [(1, 1), (8, 2), (60, 4), (128, 8), (512, 32)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_matches_spec(E, k, renormalize):
    T = random.randint(1, 40)
    logits = torch.randn(T, E).to(random.choice(DTYPES))
    got = ref.moe_router(logits, k, renormalize)
    w, ids, counts, prob_sum = spec_router(logits, k, renormalize)
    assert torch.equal(got.ids, ids) and torch.equal(got.counts, counts)
    assert got.weights.dtype == got.prob_sum.dtype == torch.float32
    assert rel_err(got.weights, w) < 1e-5 and rel_err(got.prob_sum, prob_sum) < 1e-5


def test_reference_equals_qwen3_formulation():
    """transformers' Qwen3-MoE: softmax(fp32) -> topk -> divide by the sum (tie-free fp32 inputs; torch.topk
    leaves the order of equal values unspecified)."""
    logits = torch.randn(300, 128)
    p = torch.softmax(logits.float(), -1)
    w, i = torch.topk(p, 8, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    got = ref.moe_router(logits, 8)
    assert torch.equal(got.ids.long(), i) and rel_err(got.weights, w) < 1e-6
    # load-balancing loss as transformers computes it for one layer
    mask = torch.nn.functional.one_hot(i, 128).float()          # [T, K, E]
    hf = (mask.mean(0) * p.mean(0).unsqueeze(0)).sum() * 128
    assert rel_err(ref.load_balancing_loss(got.counts, got.prob_sum, 300), hf) < 1e-5


def test_ties_and_nan_rank_deterministically():
    logits = torch.tensor([[1.0, 3.0, 3.0, float("nan"), 3.0, 0.0]])
    r = ref.moe_router(logits, 4, renormalize=False)
    assert r.ids.tolist() == [[1, 2, 4, 0]]


@pytest.mark.parametrize("renormalize", [True, False])
def test_backward_formula_matches_autograd(renormalize):
    """router_logits_grad (used by the kernel's registered backward) vs autograd through the reference."""
    logits = torch.randn(50, 64, requires_grad=True)
    r = ref.moe_router(logits, 6, renormalize)
    gw, gp = torch.randn(50, 6), torch.randn(64)
    (r.weights * gw).sum().add_((r.prob_sum * gp).sum()).backward()
    got = router_logits_grad(logits.detach(), r.ids, r.weights.detach(), renormalize, gw, gp)
    assert rel_err(got, logits.grad) < 1e-5


@pytest.mark.skipif(not keye.kernels_available(), reason="extension not built")
def test_cpu_registration_opcheck():
    logits = torch.randn(20, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.keye.moe_router.default, (logits, 4, True))
    torch.library.opcheck(torch.ops.keye.moe_router.default, (logits, 4, False))


@pytest.mark.parametrize("call,pattern", [
    (lambda f: f(torch.zeros(4, 8, dtype=torch.int32), 2), r"'logits' must have dtype bfloat16 or float16 or float32"),
    (lambda f: f(torch.zeros(8), 2), r"'logits' must be 2-D"),
    (lambda f: f(torch.zeros(4, 513), 2), r"num_experts \(logits.size\(1\)\) must be in \[1, 512\]"),
    (lambda f: f(torch.zeros(4, 8), 9), r"'top_k' must be an int in \[1, 8\]"),
    (lambda f: f(torch.zeros(4, 64), 33), r"'top_k' must be an int in \[1, 32\]"),
])
def test_bad_arguments(call, pattern):
    with pytest.raises(ValueError, match="keye.moe_router: .*" + pattern):
        call(ops.moe_router)
    if torch.cuda.is_available() and keye.kernels_available():
        with pytest.raises(ValueError, match="keye.moe_router: .*" + pattern):
            call(lambda x, k: torch.ops.keye.moe_router(x.cuda(), k))


# ---- GPU ---------------------------------------------------------------------------------------

def _compare(logits, k, renormalize):
    got = torch.ops.keye.moe_router(logits, k, renormalize)
    want = ref.moe_router(logits, k, renormalize)
    assert torch.equal(got[1], want.ids), "ids differ"
    assert torch.equal(got[2], want.counts)
    assert rel_err(got[0], want.weights) < 1e-5
    assert rel_err(got[3], want.prob_sum) < 1e-5
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("E,k", [(1, 1), (8, 2), (60, 4), (128, 8), (256, 8), (512, 32), (33, 32)])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 3001])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference(E, k, T, dtype):
    logits = (3 * torch.randn(T, E, device="cuda")).to(dtype)
    _compare(logits, k, random.choice([True, False]))


@pytest.mark.gpu
def test_kernel_ties_strided_and_large():
    # integer-valued logits: many exact ties, broken by the lower index in both implementations
    logits = torch.randint(-3, 4, (5000, 128), device="cuda").to(torch.bfloat16)
    _compare(logits, 8, True)
    wide = torch.randn(70000, 200, device="cuda", dtype=torch.bfloat16)
    _compare(wide[:, 8:136], 8, True)  # rows strided in memory
    nan = torch.randn(100, 64, device="cuda")
    nan[::7, 3] = float("nan")
    got = torch.ops.keye.moe_router(nan, 4, True)
    assert torch.equal(got[1], ref.moe_router(nan, 4).ids)


@pytest.mark.gpu
def test_kernel_is_deterministic():
    logits = torch.randn(65536, 128, device="cuda", dtype=torch.bfloat16)
    a = torch.ops.keye.moe_router(logits, 8, True)
    for _ in range(3):
        b = torch.ops.keye.moe_router(logits, 8, True)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("renormalize", [True, False])
def test_kernel_autograd(renormalize):
    x0 = torch.randn(500, 128, device="cuda")
    gw, gp = torch.randn(500, 8, device="cuda"), torch.randn(128, device="cuda")
    grads = []
    for force in (False, True):
        x = x0.clone().requires_grad_()
        if force:
            with ops.force_reference():
                r = ops.moe_router(x, 8, renormalize)
        else:
            r = ops.moe_router(x, 8, renormalize)
        ((r.weights * gw).sum() + (r.prob_sum * gp).sum()).backward()
        grads.append(x.grad)
    assert rel_err(grads[0], grads[1]) < RTOL[torch.float32] * 10


@pytest.mark.gpu
def test_kernel_opcheck_and_compile():
    logits = torch.randn(64, 128, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.keye.moe_router.default, (logits, 8, True))
    f = torch.compile(lambda x: torch.ops.keye.moe_router(x, 8, True)[0] * 2, fullgraph=True)
    assert rel_err(f(logits.detach()), 2 * ref.moe_router(logits.detach(), 8).weights) < 1e-5
