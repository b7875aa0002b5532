"""Where a layer's time goes: CUDA time per kernel (torch.profiler), bf16, index checks off.

    python3 bench/profile_kernels.py moe  [--tokens 16384]   # keye.ops.moe forward, forward + backward (Keye shape)
    python3 bench/profile_kernels.py attn [--tokens 32768]   # keye.ops.sparse_attention forward, realistic indices
    python3 bench/profile_kernels.py moe-decode [--tokens 1]       # keye.ops.moe without grad (the decode kernels)
    python3 bench/profile_kernels.py attn-decode [--tokens 32]     # sparse_attention_decode, batch = tokens, 128K
    python3 bench/profile_kernels.py indexer-decode [--tokens 64]  # indexer_topk_decode, batch = tokens, 128K
    python3 bench/profile_kernels.py indexer-topk [--tokens 131072]  # topk_rows on the prefill layer's last
                                                                     # 1024 query rows (scores made once)
--plain runs each workload --iters times and nothing else, as a driver for Nsight Compute, e.g.
    ncu --clock-control none -k regex:block_plan -c 1 --section SpeedOfLight --section WarpStateStats \
        python3 bench/profile_kernels.py attn --plain --iters 1
Decode workloads also report the CUDA-graph replay time (what a decode step costs without host launches).
"""
import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from keye import ops
from keye.bench.timing import capture_graph


def kernel_times(fn, iters):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name[:90]] += e.device_time / iters / 1000.0  # ms per iteration
    return per_kernel


def pipelined_ms(fn, iters):
    """Per call, with calls issued back to back (host launch latency hidden behind earlier calls)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def single_ms(fn, iters):
    """Median of single calls on an idle GPU (what keye bench reports): includes the host's launch latency."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def moe_workloads(T):
    H, I, E, K = 2048, 768, 128, 8
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = ops.moe_router(torch.randn(T, E, device="cuda", dtype=torch.bfloat16), K)
    w = r.weights.detach().requires_grad_()
    gate_up = (torch.randn(E, H, 2 * I, device="cuda", dtype=torch.bfloat16) * H ** -0.5).requires_grad_()
    down = (torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16) * I ** -0.5).requires_grad_()
    d_out = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            ops.moe(x, w, r.ids, gate_up, down)

    def fwd_bwd():  # autograd.grad: no accumulation into .grad, which is not part of the layer
        torch.autograd.grad(ops.moe(x, w, r.ids, gate_up, down), (x, w, gate_up, down), d_out)

    return {"moe forward (no grad)": fwd, "moe forward + backward": fwd_bwd}


def moe_decode_workloads(T):
    H, I, E, K = 2048, 768, 128, 8
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    r = ops.moe_router(torch.randn(T, E, device="cuda", dtype=torch.bfloat16), K)
    gate_up = torch.randn(E, H, 2 * I, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    down = torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16) * I ** -0.5
    return {"moe decode (no grad)": lambda: ops.moe(x, r.weights, r.ids, gate_up, down)}


def attn_decode_workloads(B, ctx=131072):
    from keye.bench.sparse_attention import HEAD_DIM, KV_HEADS, Q_HEADS, TOPK

    cache = [torch.randn(B * ctx // 64, 64, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    q = torch.randn(B, 1, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    base = (torch.arange(B, device="cuda") * ctx)[:, None, None]
    slots = ((torch.rand(B, 1, TOPK, device="cuda") * ctx).long() + base).int()
    return {f"sparse attention decode, batch {B}, context {ctx}": lambda: ops.sparse_attention_decode(q, *cache, slots)}


def indexer_decode_workloads(B, ctx=131072):
    from keye.bench.dsa_indexer import D_I, H_I, TOPK, paged_cache

    k_cache, k_scale_cache, block_table = paged_cache(B, ctx, torch.device("cuda"))
    q8, qs = ops.indexer_rotate_quantize(torch.randn(B, 1, H_I, D_I, device="cuda", dtype=torch.bfloat16))
    w = torch.randn(B, 1, H_I, device="cuda")
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    args = (q8, qs, w, k_cache, k_scale_cache, block_table, seq_lens, TOPK)
    return {f"indexer decode, batch {B}, context {ctx}": lambda: ops.indexer_topk_decode(*args)}


def indexer_topk_workloads(T, rows=1024):
    """The top-k kernel alone on the score rows of the last `rows` queries of a T-token prefill layer (the rows
    that take the one-read sampled path from 32K columns on); the scores are computed once, outside."""
    from keye.bench.dsa_indexer import TOPK, _inputs

    q8, qs, w, k8, ks = _inputs(T, torch.device("cuda"))
    a = max(T - rows, 0)
    ld = (T + 127) // 128 * 128
    scores = torch.empty(T - a, ld, device="cuda")
    torch.ops.keye.indexer_logits(q8[a:], qs[a:], w[a:], k8, ks, a, scores)
    lengths = torch.arange(a + 1, T + 1, dtype=torch.int32, device="cuda")
    idx = torch.empty(T - a, TOPK, dtype=torch.int32, device="cuda")
    return {f"indexer top-k, rows {a + 1}..{T} of a {T}-token layer":
            lambda: torch.ops.keye.topk_rows(scores, lengths, TOPK, 0, idx, None)}


def graph_ms(fn, iters):
    """Median CUDA-graph replay time of one call."""
    return single_ms(capture_graph(fn).replay, iters)


def attn_workloads(T):
    from keye.bench.sparse_attention import HEAD_DIM, KV_HEADS, Q_HEADS, TOPK, realistic_indices

    q = torch.randn(T, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(T, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    idx = realistic_indices(T, TOPK, "cuda")
    return {"sparse attention forward (realistic)": lambda: ops.sparse_attention(q, k, v, idx, cu)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("layer", choices=("moe", "attn", "moe-decode", "attn-decode", "indexer-decode", "indexer-topk"))
    p.add_argument("--tokens", type=int)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--plain", action="store_true", help="only run the workloads (a driver for ncu)")
    a = p.parse_args()
    torch.manual_seed(0)
    T = a.tokens or {"moe": 16384, "attn": 32768, "moe-decode": 1, "attn-decode": 32, "indexer-decode": 64,
                     "indexer-topk": 131072}[a.layer]
    make = {"moe": moe_workloads, "attn": attn_workloads, "moe-decode": moe_decode_workloads,
            "attn-decode": attn_decode_workloads, "indexer-decode": indexer_decode_workloads,
            "indexer-topk": indexer_topk_workloads}[a.layer]
    workloads = make(T)
    decode = a.layer.endswith("decode")
    with ops.index_checks(False):
        for name, fn in workloads.items():
            if a.plain:
                for _ in range(a.iters):
                    fn()
                torch.cuda.synchronize()
                continue
            times = kernel_times(fn, a.iters)
            total = sum(times.values())
            print(f"\n{name}, T = {T}: {total:.4f} ms of kernel time per iteration; "
                  f"{pipelined_ms(fn, a.iters):.4f} ms per call back to back, {single_ms(fn, a.iters):.4f} ms alone"
                  + (f", {graph_ms(fn, 50):.4f} ms graph replay" if decode else ""))
            for k, v in sorted(times.items(), key=lambda kv: -kv[1]):
                print(f"  {v:9.4f} ms  {100 * v / total:5.1f}%  {k}")


if __name__ == "__main__":
    main()
