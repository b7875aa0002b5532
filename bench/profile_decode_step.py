"""Where a decode step of the full Keye-VL-2.0-30B-A3B model goes, on a CUDA GPU.

    python bench/profile_decode_step.py 131072x1 32768x1 8192x16      # CONTEXTxBATCH

Random bf16 weights (bench/model_generate.py), each layer's cache filled with random K / V and random FP8 index keys
(no prefill: seconds instead of minutes per context), one new token per sequence. Prints per shape: a generate-like
step (prepare + graph replay + sampling) and its parts, CUDA-graph replays back to back, the graph's kernels summed
by name (torch.profiler), and an eager step. Index checks off. Twenty-sixth session's numbers: NOTES.md (issue 5).
"""
import os, sys, time, collections
os.environ["KEYE_INDEX_CHECKS"] = "0"
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_generate import random_model
from keye.model import PagedKVCache, keye_vl_2_30b_a3b, sample
from keye.model.cuda_graph import GraphedDecoder
from keye.ops.reference.dsa_indexer import FP8
from torch.profiler import profile, ProfilerActivity

cfg = keye_vl_2_30b_a3b()
t = time.perf_counter()
model = random_model(cfg, "cuda")
torch.cuda.synchronize()
print(f"weights {time.perf_counter() - t:.1f} s", flush=True)
shapes = [tuple(int(v) for v in s.split("x")) for s in sys.argv[1:]] or [(131072, 1), (32768, 1), (8192, 16)]


def kernel_table(prof, steps, top=40):
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            cnt[e.name] += 1
    all_us = sum(tot.values()) / steps
    print(f"  kernels per step: {sum(cnt.values()) / steps:.0f}, summed duration {all_us / 1e3:.2f} ms")
    for name, us in tot.most_common(top):
        print(f"  {us / steps:9.1f} us/step {cnt[name] / steps:6.1f}x  {name[:105]}")


for ctx, B in shapes:
    cache = PagedKVCache.for_tokens(cfg, [ctx + 64] * B, dtype=torch.bfloat16, device="cuda")
    seqs = [cache.new_sequence() for _ in range(B)]
    cache.prepare(seqs, ctx)
    g = torch.Generator(device="cuda").manual_seed(0)
    for l in range(cfg.num_hidden_layers):
        cache.k[l].normal_(generator=g)
        cache.v[l].normal_(generator=g)
        cache.index_k[l].copy_((torch.randn(cache.index_k[l].shape, device="cuda", generator=g) * 40).to(FP8))
        cache.index_scale[l].uniform_(0.5, 1.0, generator=g)
    dec = GraphedDecoder(model, cache)
    pos0 = ctx

    def inputs():
        global pos0
        step = cache.prepare(seqs, 1)
        ids = torch.randint(0, 100000, (B,), device="cuda")
        pos = torch.full((3, B), pos0, dtype=torch.long, device="cuda")
        pos0 += 1
        return step, ids, pos

    with torch.no_grad():
        # graph: full host step (prepare + replay + sample) and the replay alone
        for _ in range(3):
            s, i, p = inputs()
            lg = dec(s, i, p)
        torch.cuda.synchronize()
        n = 10
        t = time.perf_counter()
        for _ in range(n):
            s, i, p = inputs()
            lg = dec(s, i, p)
            toks = [sample(lg[r], 1.0, 0.95, None) for r in range(B)]
        torch.cuda.synchronize()
        host_step = (time.perf_counter() - t) / n
        graph = dec.graphs[B][0]
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        torch.cuda.synchronize()
        ev[0].record()
        for _ in range(n):
            graph.replay()
        ev[1].record()
        torch.cuda.synchronize()
        replay_ms = ev[0].elapsed_time(ev[1]) / n
        print(f"context {ctx} x batch {B}: generate-like step {host_step * 1e3:.2f} ms "
              f"({B / host_step:.1f} tok/s); graph replays back to back {replay_ms:.2f} ms", flush=True)
        parts = collections.defaultdict(list)
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            s, i, p = inputs()
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            lg = dec(s, i, p)
            t2 = time.perf_counter()
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            toks = [sample(lg[r], 1.0, 0.95, None) for r in range(B)]
            t4 = time.perf_counter()
            graph.replay()
            t5 = time.perf_counter()
            torch.cuda.synchronize()
            t6 = time.perf_counter()
            for k, v in (("prepare", t1 - t0), ("decoder call (host)", t2 - t1), ("decoder until done", t3 - t1),
                         ("sample", t4 - t3), ("bare replay (host)", t5 - t4), ("bare replay until done", t6 - t4)):
                parts[k].append(v * 1e3)
        print("  " + "; ".join(f"{k} {sorted(v)[len(v) // 2]:.2f} ms" for k, v in parts.items()), flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
        print(" graph replay kernels:")
        kernel_table(prof, 3)
        # eager step
        for _ in range(2):
            s, i, p = inputs()
            model(inputs_embeds=model.model.embed_tokens(i), position_ids=p, cache=cache, step=s, logits="last",
                  attention_mode="sparse")
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            s, i, p = inputs()
            model(inputs_embeds=model.model.embed_tokens(i), position_ids=p, cache=cache, step=s, logits="last",
                  attention_mode="sparse")
        torch.cuda.synchronize()
        print(f" eager step {(time.perf_counter() - t) / 3 * 1e3:.1f} ms", flush=True)
    del dec, cache, graph
    torch.cuda.empty_cache()
