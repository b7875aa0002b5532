"""Every deterministic kernel gives bit-identical results while another kernel runs beside it on a second stream.

A kernel that is right alone can still race when its CTAs share SMs with another kernel's: timing changes, and
an unordered access that always won before may lose. That happened in the DSA score kernel (a ring stage's
read still in flight when its bulk-copy refill landed, seen only beside the shared-memory-heavy top-k kernel;
tests/test_dsa_indexer_cuda.py has its own test). Here each op runs once alone, then again several times while
the top-k kernel (shared-memory atomics, long rows) runs on a side stream, and must give the same bits.
"""

import contextlib

import pytest
import torch

import keye.ops as ops
from keye.bench.dsa_indexer import D_I, H_I, _inputs, paged_cache
from keye.bench.moe_gemm import _setup as moe_inputs
from keye.bench.sparse_attention import HEAD_DIM, KV_HEADS, Q_HEADS, realistic_indices

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOPK = 2048
REPS = 4


@pytest.fixture(scope="module")
def noise():
    """Launches the top-k kernel over 1024 rows of 64K scores on a side stream, four times."""
    scores = torch.randn(1024, 65536, device=DEV)
    lengths = torch.full((1024,), 65536, dtype=torch.int32, device=DEV)
    idx = torch.empty(1024, TOPK, dtype=torch.int32, device=DEV)
    side = torch.cuda.Stream()

    def launch():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(4):
                torch.ops.keye.topk_rows(scores, lengths, TOPK, 0, idx, None)
        return side

    return launch


def assert_same_beside_noise(run, noise):
    """run() -> tuple of fresh tensors; alone vs. with the noise kernel on a side stream, REPS times."""
    with ops.index_checks(False):
        alone = run()
        for rep in range(REPS):
            side = noise()
            got = run()
            torch.cuda.current_stream().wait_stream(side)
            for i, (a, b) in enumerate(zip(alone, got)):
                assert torch.equal(a, b), f"output {i} differs from the lone run (repetition {rep})"


@contextlib.contextmanager
def deterministic():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


def _attention_inputs(T):
    q = torch.randn(T, Q_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(T, KV_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    return q, k, v, realistic_indices(T, TOPK, DEV), torch.tensor([0, T], dtype=torch.int32, device=DEV)


def test_sparse_attention_forward(noise):
    q, k, v, idx, cu = _attention_inputs(8192)
    with torch.no_grad():
        assert_same_beside_noise(lambda: ops.sparse_attention(q, k, v, idx, cu), noise)


def test_sparse_attention_backward_deterministic_mode(noise):
    q, k, v, idx, cu = _attention_inputs(8192)
    do = torch.randn_like(q)

    def run():
        o, _ = ops.sparse_attention(q, k, v, idx, cu)
        return torch.autograd.grad(o, (q, k, v), do)

    with deterministic():
        assert_same_beside_noise(run, noise)


def test_sparse_attention_decode(noise):
    B, ctx = 8, 32768
    cache = [torch.randn(B * ctx // 64, 64, KV_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
    q = torch.randn(B, 1, Q_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
    slots = (torch.randint(0, ctx, (B, 1, TOPK), device=DEV) + (torch.arange(B, device=DEV) * ctx)[:, None, None])
    assert_same_beside_noise(lambda: ops.sparse_attention_decode(q, *cache, slots.int()), noise)


def test_moe_layer_forward_and_backward(noise):
    x, weights, ids, w1, w2 = moe_inputs(4096, 2048, 768, 128, 8, torch.device(DEV))
    leaves = [t.detach().requires_grad_() for t in (x, weights, w1, w2)]
    d_out = torch.randn_like(x)

    def run():
        out = ops.moe(leaves[0], leaves[1], ids, leaves[2], leaves[3])
        return (out.detach(), *torch.autograd.grad(out, leaves, d_out))

    assert_same_beside_noise(run, noise)


def test_moe_decode_fused(noise):
    """One token through the one-kernel decode layer (cooperative grid, bulk-copy ring, grid barriers)."""
    x, weights, ids, w1, w2 = moe_inputs(1, 2048, 1408, 64, 8, torch.device(DEV))
    assert_same_beside_noise(lambda: (ops.moe_decode(x, ids, weights, w1, w2),), noise)


def test_moe_router(noise):
    logits = torch.randn(16384, 128, device=DEV, dtype=torch.bfloat16)
    assert_same_beside_noise(lambda: tuple(ops.moe_router(logits, 8)), noise)


def test_indexer_prefill(noise):
    T = 32768
    q8, qs, w, k8, ks = _inputs(T, torch.device(DEV))
    cu = torch.tensor([0, T], device=DEV)
    assert_same_beside_noise(lambda: ops.indexer_topk_prefill(q8, qs, w, k8, ks, cu, TOPK, return_scores=True), noise)


@pytest.mark.parametrize("ctx", [32768, 65536])  # the split top-k; the candidate lists (decode_uses_lists)
def test_indexer_decode(noise, ctx):
    B = 8
    k_cache, k_scale_cache, block_table = paged_cache(B, ctx, torch.device(DEV))
    q8, qs = ops.indexer_rotate_quantize(torch.randn(B, 1, H_I, D_I, device=DEV, dtype=torch.bfloat16))
    w = torch.randn(B, 1, H_I, device=DEV)
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    assert_same_beside_noise(lambda: ops.indexer_topk_decode(q8, qs, w, k_cache, k_scale_cache, block_table,
                                                             seq_lens, TOPK, return_scores=True), noise)
