"""Where a layer's time goes: CUDA time per kernel (torch.profiler), bf16, index checks off.

    python3 bench/profile_kernels.py moe  [--tokens 16384]   # keye.ops.moe forward, forward + backward (Keye shape)
    python3 bench/profile_kernels.py attn [--tokens 32768]   # keye.ops.sparse_attention forward, realistic indices
    python3 bench/profile_kernels.py moe-decode [--tokens 1]       # keye.ops.moe without grad (the decode kernels)
    python3 bench/profile_kernels.py attn-decode [--tokens 32]     # sparse_attention_decode, batch = tokens, 128K
    python3 bench/profile_kernels.py indexer-decode [--tokens 64]  # indexer_topk_decode, batch = tokens, 128K
    python3 bench/profile_kernels.py indexer-topk [--tokens 131072]  # topk_rows on the prefill layer's last
                                                                     # 1024 query rows (scores made once)
--timeline prints one call's host and device events on one clock (torch.profiler, CPU + CUDA): when the host
reaches each op and CUDA runtime call, and when each kernel runs, in us from the end of an L2 flush (as in
`keye bench`'s one-call timings). The profiler adds several us of host time per event, so it shows the order of
events, not the size of host gaps.
--segments (moe only) times the no-grad layer op by op with CUDA events between the ops, after three preludes:
idle (host sync, then the flush: the GPU idled while the host read the previous results), hot (a 1 ms spin, host
sync, flush) and queued (flush, 1 ms spin: the host is ahead). It separates host latency from slow kernels. Then
the whole keye.ops.moe call in a loop (flush, start, call, end) with and without a host sync after each call: plain,
with a 1 ms spin before the start or after the end, and with the torch pipeline after each call (keye bench's
round-robin): what the one-call figure depends on.
--plain runs each workload --iters times and nothing else, as a driver for Nsight Compute, e.g.
    ncu --clock-control none -k regex:block_plan -c 1 --section SpeedOfLight --section WarpStateStats \
        python3 bench/profile_kernels.py attn --plain --iters 1
Decode workloads also report the CUDA-graph replay time (what a decode step costs without host launches).
--sweep (moe-decode only) times one token through the fused kernel (ops.moe_decode) and through the two decode
kernels over I = 64 .. 2048 (H = 2048, 64 experts, top-8), per layer in CUDA graphs of 8 layers, and fits
time = fixed + bytes / rate to each (NOTES.md, eleventh session: both have a ~20 us floor).
--floor (moe-decode only) splits that floor: own vs shared vs repeated weights, each kernel alone, kernel durations
inside a replay, and a graph's per-node cost (moe_decode_floor below; bench/decode_floor_ceiling.cu measures
launch, grid-barrier and memory round-trip costs in isolation).
"""
import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from keye import ops
from keye.bench.timing import capture_graph


def kernel_times(fn, iters, counts=None):
    """ms of CUDA time per iteration of fn, by kernel name (first 90 characters); `counts`, if given, is filled
    with the launches per iteration of each name."""
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
            if counts is not None:
                counts[e.name[:90]] = counts.get(e.name[:90], 0) + 1 / iters
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


def timeline(fn):
    """One call's events in time order: (us from the end of the L2 flush, us long, host op / runtime call / kernel)."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
    rows = []
    for e in prof.events():
        on_gpu = e.device_type == torch.autograd.DeviceType.CUDA
        name = e.name
        if not on_gpu and not (name.startswith(("keye::", "cuda")) or name in ("aten::empty", "aten::zeros")):
            continue
        rows.append((e.time_range.start, e.time_range.end - e.time_range.start, "gpu " if on_gpu else "host", name))
    rows.sort()
    flush_end = next((t + d for t, d, w, n in rows if w == "gpu " and "fill" in n.lower()), rows[0][0])
    print(f"  (0 = end of the L2 flush on the GPU; host and device share the profiler's clock) "
          f"call: {start.elapsed_time(end) * 1e3:.1f} us between its events")
    for t, d, where, name in rows:
        print(f"  {t - flush_end:9.1f} {d:8.1f}  {where} {name[:100]}")


def moe_segments(T, reps=30):
    """keye.ops.moe (no grad) op by op, CUDA events between the ops, after the three preludes of --segments."""
    from keye.bench.moe_gemm import _setup

    E = 128
    x, weights, ids, gate_up, down = _setup(T, 2048, 768, E, 8, torch.device("cuda"))
    kk = torch.ops.keye
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    names = ("route", "permute", "gate_up", "swiglu", "down", "unpermute")

    def layer(ev):  # the ops of keye.ops.moe's _forward, an event after each
        dest, src, off = kk.moe_route(ids, E, 1); ev[1].record()
        xs = kk.moe_permute(x, dest, src, None); ev[2].record()
        h = kk.moe_grouped_mm(xs, gate_up, off, False, -1); ev[3].record()
        a = kk.moe_swiglu(h); ev[4].record()
        y = kk.moe_grouped_mm(a, down, off, False, -1); ev[5].record()
        kk.moe_unpermute(y, dest, weights); ev[6].record()

    preludes = {"idle": lambda: flush.zero_(),
                "hot": lambda: (torch.cuda._sleep(2_000_000), torch.cuda.synchronize(), flush.zero_()),
                "queued": lambda: (flush.zero_(), torch.cuda._sleep(2_000_000))}
    for label, prelude in preludes.items():
        per = []
        for i in range(reps + 3):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(7)]
            prelude()
            ev[0].record()
            layer(ev)
            torch.cuda.synchronize()
            if i >= 3:
                per.append([ev[j].elapsed_time(ev[j + 1]) * 1e3 for j in range(6)])
        med = [sorted(c)[len(c) // 2] for c in zip(*per)]
        total = sorted(sum(p) for p in per)[len(per) // 2]
        print(f"  {label:7s} {total:8.1f} us: " + "  ".join(f"{n} {m:.1f}" for n, m in zip(names, med)))


def moe_call_modes(T, reps=40):
    """Median us of keye.ops.moe (no grad) called in a loop, by what runs around each call (see --segments)."""
    from keye.bench.moe_gemm import _setup, _torch_layer

    x, w, ids, w1, w2 = _setup(T, 2048, 768, 128, 8, torch.device("cuda"))
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    keye_call, torch_call = (lambda: ops.moe(x, w, ids, w1, w2)), (lambda: _torch_layer(x, w, ids, w1, w2))

    def loop(mode, sync):
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for _ in range(3):
            keye_call(), torch_call()
        torch.cuda.synchronize()
        for start, end in ev:
            flush.zero_()
            if mode == "spin before start":
                torch.cuda._sleep(2_000_000)
            start.record()
            keye_call()
            end.record()
            if mode == "spin after end":
                torch.cuda._sleep(2_000_000)
            elif mode == "torch pipeline after":
                flush.zero_()
                torch_call()
            if sync:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        return sorted(s.elapsed_time(e) for s, e in ev)[reps // 2] * 1e3

    with torch.no_grad():
        for mode in ("plain", "spin before start", "spin after end", "torch pipeline after"):
            print(f"  {mode:22s} no sync {loop(mode, False):8.1f} us, host sync after each call {loop(mode, True):8.1f} us")


def moe_decode_sweep(layers=8):
    from keye.bench.moe_gemm import _setup
    from keye.bench.timing import median_ms_interleaved

    H, E, K, kk = 2048, 64, 8, torch.ops.keye
    rows = []
    for I in (64, 256, 768, 1408, 2048):
        stack = [_setup(1, H, I, E, K, torch.device("cuda")) for _ in range(layers)]  # x, weights, ids, w1, w2
        graphs = {"two": capture_graph(*[lambda s=s: kk.moe_decode_down(kk.moe_decode_gate_up(s[0], s[2], s[3]), s[2],
                                                                         s[1], s[4]) for s in stack]),
                  "fused": capture_graph(*[lambda s=s: kk.moe_decode(s[0], s[2], s[1], s[3], s[4]) for s in stack])}
        ms = median_ms_interleaved({k: g.replay for k, g in graphs.items()}, torch.device("cuda"), 40)
        experts = sum(int(torch.unique(s[2][s[2] >= 0]).numel()) for s in stack) / layers
        mb = experts * 3 * H * I * 2 / 1e6
        rows.append((mb, ms["two"] * 1e3 / layers, ms["fused"] * 1e3 / layers))
        print(f"I = {I:5d}: {mb:6.1f} MB routed   two kernels {rows[-1][1]:6.1f} us   fused {rows[-1][2]:6.1f} us")
        del graphs, stack
        torch.cuda.empty_cache()
    mb = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    for col, name in ((1, "two kernels"), (2, "fused")):
        fit = torch.linalg.lstsq(torch.stack([torch.ones_like(mb), mb], 1),
                                 torch.tensor([r[col] for r in rows], dtype=torch.float64)[:, None]).solution[:, 0]
        print(f"{name}: {fit[0]:.1f} us + bytes at {1 / fit[1]:.2f} TB/s (line fit)")


def moe_decode_floor(layers=8):
    """What the T = 1 layer's fixed cost is made of: per layer in CUDA graphs of `layers` layers (L2 flushed before
    each replay), the two decode kernels together and each alone, and the fused kernel, with (1) every layer on its
    own weights and routing, (2) every layer on layer 0's weights with its own routing, (3) layer 0 repeated (its
    translations hot after the first layer, and at I = 64 its 6 MB of weights in L2 too); then the kernels' own durations inside one replay of (1)
    (torch.profiler) and a graph of tiny kernels (the per-node cost of a graph)."""
    from keye.bench.moe_gemm import _setup
    from keye.bench.timing import median_ms_interleaved

    H, E, K, kk, dev = 2048, 64, 8, torch.ops.keye, torch.device("cuda")
    for I in (64, 768):
        own = [_setup(1, H, I, E, K, dev) for _ in range(layers)]  # x, weights, ids, w1, w2
        cases = {"own weights": own, "shared weights": [(s[0], s[1], s[2], own[0][3], own[0][4]) for s in own],
                 "layer 0 repeated": [own[0]] * layers}
        mb = sum(int(torch.unique(s[2][s[2] >= 0]).numel()) for s in own) / layers * 3 * H * I * 2 / 1e6
        print(f"I = {I} ({mb:.1f} MB routed per layer), us per layer:")
        for case, stack in cases.items():
            acts = [kk.moe_decode_gate_up(s[0], s[2], s[3]) for s in stack]
            graphs = {
                "two kernels": capture_graph(*[lambda s=s: kk.moe_decode_down(kk.moe_decode_gate_up(s[0], s[2], s[3]),
                                                                               s[2], s[1], s[4]) for s in stack]),
                "gate_up": capture_graph(*[lambda s=s: kk.moe_decode_gate_up(s[0], s[2], s[3]) for s in stack]),
                "down": capture_graph(*[lambda s=s, a=a: kk.moe_decode_down(a, s[2], s[1], s[4])
                                        for s, a in zip(stack, acts)]),
                "fused": capture_graph(*[lambda s=s: kk.moe_decode(s[0], s[2], s[1], s[3], s[4]) for s in stack])}
            ms = median_ms_interleaved({k: g.replay for k, g in graphs.items()}, dev, 40)
            print(f"  {case:17s} " + "   ".join(f"{k} {v * 1e3 / layers:5.1f}" for k, v in ms.items()))
            if case == "own weights":
                for k in ("two kernels", "fused"):
                    times = kernel_times(graphs[k].replay, 5)
                    print(f"    inside one replay of '{k}' (profiler, us per layer): " + ", ".join(
                        f"{n[:40]} {v * 1e3 / layers:.1f}" for n, v in sorted(times.items(), key=lambda kv: -kv[1])))
            del graphs, acts
        del own, cases
        torch.cuda.empty_cache()
    t = torch.zeros(1, device=dev)
    for n in (layers, 2 * layers):
        g = capture_graph(*[lambda: t.add_(1)] * n)
        print(f"graph of {n} one-element kernels: {single_ms(g.replay, 50) * 1e3 / n:.2f} us per kernel")


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
    p.add_argument("--timeline", action="store_true", help="one call's host and device events on one clock")
    p.add_argument("--segments", action="store_true", help="moe: op-by-op event timing after three preludes")
    p.add_argument("--sweep", action="store_true", help="moe-decode: fused vs two kernels over the weight bytes")
    p.add_argument("--floor", action="store_true", help="moe-decode: what the per-layer fixed cost is made of")
    a = p.parse_args()
    torch.manual_seed(0)
    T = a.tokens or {"moe": 16384, "attn": 32768, "moe-decode": 1, "attn-decode": 32, "indexer-decode": 64,
                     "indexer-topk": 131072}[a.layer]
    make = {"moe": moe_workloads, "attn": attn_workloads, "moe-decode": moe_decode_workloads,
            "attn-decode": attn_decode_workloads, "indexer-decode": indexer_decode_workloads,
            "indexer-topk": indexer_topk_workloads}[a.layer]
    if a.sweep or a.floor:
        if a.layer != "moe-decode":
            p.error("--sweep and --floor are for moe-decode")
        with ops.index_checks(False), torch.no_grad():
            moe_decode_sweep() if a.sweep else moe_decode_floor()
        return
    if a.segments:
        if a.layer != "moe":
            p.error("--segments is for the moe layer")
        print(f"keye.ops.moe (no grad), T = {T}: us from the start event, per op (event to event)")
        with ops.index_checks(False):
            moe_segments(T)
            print("keye.ops.moe (no grad) called in a loop: median us between the events around each call")
            moe_call_modes(T)
        return
    workloads = make(T)
    decode = a.layer.endswith("decode")
    with ops.index_checks(False):
        for name, fn in workloads.items():
            if a.plain:
                for _ in range(a.iters):
                    fn()
                torch.cuda.synchronize()
                continue
            if a.timeline:
                print(f"\n{name}, T = {T}: one call's timeline, us")
                timeline(fn)
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
