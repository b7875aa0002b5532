"""Routed experts: the reference against a per-token restatement (CPU); the CUDA layer (keye routing, permutation,
grouped GEMM, SwiGLU and decode kernels) against the fp32 reference, forward and backward (GPU)."""

import random

import pytest
import torch
import torch.nn.functional as F

from keye import ops
from keye.ops import reference as ref
from conftest import rel_err
from spec_moe import random_topk_ids


def per_token(x, weights, ids, gate_up, down):
    I = down.shape[1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                h = x[t].double() @ gate_up[e].double()
                out[t] += float(weights[t, k]) * ((F.silu(h[:I]) * h[I:]) @ down[e].double())
    return out


def make(T, K, E, H, I, device="cpu", dtype=torch.float32, skew=False, unrouted=0.1):
    ids = random_topk_ids(T, K, E, unrouted=unrouted, device=device, skew=skew)
    weights = torch.rand(T, K, device=device)
    x = torch.randn(T, H, device=device).to(dtype)
    gate_up = (torch.randn(E, H, 2 * I, device=device) * H ** -0.5).to(dtype)
    down = (torch.randn(E, I, H, device=device) * I ** -0.5).to(dtype)
    return x, weights, ids, gate_up, down


@pytest.mark.parametrize("T", [1, 7, 50])
def test_reference_matches_per_token(T):
    args = make(T, 4, 8, 16, 12)
    assert rel_err(ref.moe(*args), per_token(*args)) < 1e-5


def test_reference_validation():
    x, w, ids, gu, dn = make(4, 2, 8, 16, 12)
    with pytest.raises(ValueError, match=r"'down' must have shape \[8, 12, 16\]"):
        ref.moe(x, w, ids, gu, dn[:, :11])
    with pytest.raises(ValueError, match=r"'ids' must hold values in \[-1, 7\]"):
        ref.moe(x, w, ids + 8, gu, dn)
    with pytest.raises(ValueError, match=r"'gate_up' has size 16 in dim 1 but the hidden size"):
        ref.moe(x[:, :8], w, ids, gu, dn)


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,E,skew,unrouted", [(1, 8, 128, False, 0.0), (333, 8, 128, True, 0.05),
                                                 (4099, 8, 128, False, 0.0), (64, 2, 16, True, 0.3)])
def test_cuda_path_matches_reference(T, K, E, skew, unrouted):
    x, w, ids, gu, dn = make(T, K, E, 256, 96, "cuda", torch.bfloat16, skew, unrouted)
    if random.random() < 0.5:
        ids[:, 0] = 3  # one expert with many tokens; most experts get none when T is small
    leaves = [t.clone().requires_grad_() for t in (x, w, gu, dn)]
    out = ops.moe(leaves[0], leaves[1], ids, leaves[2], leaves[3])
    g = torch.randn_like(out)
    (out.float() * g.float()).sum().backward()
    f32 = [t.detach().float().requires_grad_() for t in (x, w, gu, dn)]
    want = ref.moe(f32[0], f32[1], ids, f32[2], f32[3])
    (want * g.float()).sum().backward()
    assert rel_err(out, want) < 1e-2
    for got, exp in zip(leaves, f32):
        assert rel_err(got.grad, exp.grad) < 2e-2


def test_decode_preferred_follows_the_measured_crossovers():
    """keye.ops.moe's choice between the decode kernels and the grouped GEMMs (132 SMs, the H200's): the batches where
    the decode kernels measured faster take them (Keye T <= 8, 2048/1408/64 T <= 4, DeepSeek-V3 shape T <= 2; T = 3
    there was not measured), larger ones the GEMMs."""
    from keye.ops.moe import decode_preferred

    def decode_batches(E, I):
        return [T for T in range(1, 33) if decode_preferred(8 * T, E, I, 132)]

    assert decode_batches(128, 768) == list(range(1, 9))
    assert decode_batches(64, 1408) == list(range(1, 5))
    assert decode_batches(256, 2048) == [1, 2, 3]
    assert not decode_preferred(8, 8, 16, 132), "8 slots on 8 experts: more than half a slot per expert"


@pytest.mark.gpu
def test_cuda_backward_is_deterministic():
    x, w, ids, gu, dn = make(2048, 8, 128, 256, 128, "cuda", torch.bfloat16, True, 0.05)
    g = torch.randn(x.shape, device="cuda").bfloat16()
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, w, gu, dn)]
        ops.moe(leaves[0], leaves[1], ids, leaves[2], leaves[3]).backward(g)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 5, 8, 9, 64, 200])
def test_cuda_inference_path_matches_reference(T):
    """Without gradients, small batches take the decode kernels (keye.ops.moe.decode_preferred: T = 1, 5, 8 here),
    larger ones the grouped GEMMs."""
    x, w, ids, gu, dn = make(T, 8, 128, 512, 256, "cuda", torch.bfloat16, False, 0.05)
    with torch.no_grad():
        out = ops.moe(x, w, ids, gu, dn)
    assert rel_err(out, ref.moe(x.float(), w, ids, gu.float(), dn.float())) < 1e-2
