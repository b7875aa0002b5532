"""Where a decode step of the full Keye-VL-2.0-30B-A3B model goes, on a CUDA GPU.

    python bench/profile_decode_step.py 131072x1 32768x1 8192x16      # CONTEXTxBATCH

Random bf16 weights (bench/model_generate.py), each layer's cache filled with random K / V and random FP8 index keys
(no prefill: seconds instead of minutes per context), one new token per sequence. Prints per shape: a generate-like
step (prepare + graph replay + sampling) and its parts, CUDA-graph replays back to back, the graph's kernels summed
by name (torch.profiler), and an eager step. Index checks off. Twenty-sixth session's numbers: NOTES.md (issue 5).
"""
import os
import statistics
import sys
import time
from collections import defaultdict

os.environ["KEYE_INDEX_CHECKS"] = "0"
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_generate import random_model  # noqa: E402
from profile_kernels import kernel_times  # noqa: E402

from keye.model import PagedKVCache, keye_vl_2_30b_a3b, sample  # noqa: E402
from keye.model.cuda_graph import GraphedDecoder  # noqa: E402
from keye.ops.reference.dsa_indexer import FP8  # noqa: E402


def random_cache(cfg, ctx, B):
    """A cache holding B sequences of ctx random tokens in every layer (K / V normal, FP8 index keys, scales)."""
    cache = PagedKVCache.for_tokens(cfg, [ctx + 64] * B, dtype=torch.bfloat16, device="cuda")
    seqs = [cache.new_sequence() for _ in range(B)]
    cache.prepare(seqs, ctx)
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer in range(cfg.num_hidden_layers):
        cache.k[layer].normal_(generator=g)
        cache.v[layer].normal_(generator=g)
        keys = torch.randn(cache.index_k[layer].shape, device="cuda", generator=g) * 40
        cache.index_k[layer].copy_(keys.to(FP8))
        cache.index_scale[layer].uniform_(0.5, 1.0, generator=g)
    return cache, seqs


def profile_shape(model, cfg, ctx, B, n=10, top=40):
    cache, seqs = random_cache(cfg, ctx, B)
    dec = GraphedDecoder(model, cache)
    next_pos = [ctx]

    def inputs():  # one new token per sequence: the step, token ids, positions
        step = cache.prepare(seqs, 1)
        ids = torch.randint(0, 100000, (B,), device="cuda")
        pos = torch.full((3, B), next_pos[0], dtype=torch.long, device="cuda")
        next_pos[0] += 1
        return step, ids, pos

    def sample_all(logits):  # as generate() samples: row by row on the host
        return [sample(logits[r], 1.0, 0.95, None) for r in range(B)]

    def eager_step():
        s, i, p = inputs()
        model(inputs_embeds=model.model.embed_tokens(i), position_ids=p, cache=cache, step=s, logits="last",
              attention_mode="sparse")

    for _ in range(3):  # the graph is captured on the first step
        dec(*inputs())
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        sample_all(dec(*inputs()))
    torch.cuda.synchronize()
    host_step = (time.perf_counter() - t) / n
    graph = dec.graphs[B][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    print(f"context {ctx} x batch {B}: generate-like step {host_step * 1e3:.2f} ms ({B / host_step:.1f} tok/s); "
          f"graph replays back to back {start.elapsed_time(end) / n:.2f} ms", flush=True)

    parts = defaultdict(list)
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step = inputs()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        logits = dec(*step)
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        sample_all(logits)
        t4 = time.perf_counter()
        graph.replay()
        t5 = time.perf_counter()
        torch.cuda.synchronize()
        t6 = time.perf_counter()
        for k, v in (("prepare", t1 - t0), ("decoder call (host)", t2 - t1), ("decoder until done", t3 - t1),
                     ("sample", t4 - t3), ("bare replay (host)", t5 - t4), ("bare replay until done", t6 - t4)):
            parts[k].append(v * 1e3)
    print("  " + "; ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in parts.items()), flush=True)

    counts = {}
    times = kernel_times(graph.replay, 3, counts)
    print(f" graph replay kernels: {sum(counts.values()):.0f} per step, summed duration {sum(times.values()):.2f} ms")
    print_top_kernels(times, counts, top)
    print(f" eager step {host_ms(eager_step):.1f} ms", flush=True)


def host_ms(fn, warmup=2, reps=3):
    """ms per call of fn timed on the host (the GPU synchronised before and after the timed calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def print_top_kernels(times, counts, top):
    """The `top` kernels by summed time per step (kernel_times' output) with their launches per step."""
    for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms * 1e3:9.1f} us/step {counts[name]:6.1f}x  {name[:110]}")


def full_model():
    """(config, model): the full Keye-VL-2.0-30B-A3B with random bf16 weights on the GPU."""
    cfg = keye_vl_2_30b_a3b()
    t = time.perf_counter()
    model = random_model(cfg, "cuda")
    torch.cuda.synchronize()
    print(f"weights {time.perf_counter() - t:.1f} s", flush=True)
    return cfg, model


def shapes_from_argv(default):
    """[(context, batch)] from CONTEXTxBATCH arguments, else `default`."""
    return [tuple(int(v) for v in s.split("x")) for s in sys.argv[1:]] or default


def main():
    cfg, model = full_model()
    with torch.no_grad():
        for ctx, B in shapes_from_argv([(131072, 1), (32768, 1), (8192, 16)]):
            profile_shape(model, cfg, ctx, B)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
