"""Decode step of the full model: fused norm kernels vs the eager reference norms, same process, same caches."""
import os
import sys
import time

os.environ["KEYE_INDEX_CHECKS"] = "0"
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_generate import random_model  # noqa: E402
from profile_decode_step import random_cache  # noqa: E402
from profile_kernels import kernel_times  # noqa: E402

import keye.model.attention as attention_module  # noqa: E402
import keye.ops  # noqa: E402
from keye.bench.timing import median_ms_interleaved, rel_err  # noqa: E402
from keye.model import keye_vl_2_30b_a3b  # noqa: E402
from keye.model.cuda_graph import GraphedDecoder  # noqa: E402
from keye.ops import reference as ref  # noqa: E402

FUSED = {n: getattr(keye.ops, n) for n in ("rms_norm", "add_rms_norm", "rms_norm_rope", "layer_norm_rope")}
PACKED = attention_module._packed_weight


def use(fused: bool, packed: bool = True):
    """Route the model through the norm kernels or their references, the packed GEMM or one per projection."""
    for n, f in FUSED.items():
        setattr(keye.ops, n, f if fused else getattr(ref, n))
    attention_module._packed_weight = PACKED if packed else (lambda linears: None)


def main():
    cfg = keye_vl_2_30b_a3b()
    t = time.perf_counter()
    model = random_model(cfg, "cuda")
    torch.cuda.synchronize()
    print(f"weights {time.perf_counter() - t:.1f} s", flush=True)
    dev = torch.device("cuda")
    shapes = [tuple(int(v) for v in s.split("x")) for s in sys.argv[1:]] or [(131072, 1), (8192, 16)]
    with torch.no_grad():
        for ctx, B in shapes:
            cache, seqs = random_cache(cfg, ctx, B)
            step = cache.prepare(seqs, 1)
            ids = torch.randint(0, 100000, (B,), device="cuda")
            pos = torch.full((3, B), ctx, dtype=torch.long, device="cuda")
            decs, outs = {}, {}
            for name, fused, packed in (("fused", True, True), ("unpacked", True, False),
                                        ("eager norms", False, False)):
                use(True, True)
                decs[name] = GraphedDecoder(model, cache)  # packs (once): only then switch the variant's paths
                use(fused, packed)
                outs[name] = decs[name](step, ids, pos)
                # eager step (host-bound): 3 timed after 1 warm-up
                def eager():
                    return model(inputs_embeds=model.model.embed_tokens(ids), position_ids=pos, cache=cache,
                                 step=step, logits="last", attention_mode="sparse")
                eager()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(3):
                    eager()
                torch.cuda.synchronize()
                print(f" {ctx}x{B} {name}: eager step {(time.perf_counter() - t0) / 3 * 1e3:.2f} ms", flush=True)
            use(True, True)
            err = rel_err(outs["fused"].float(), outs["eager norms"].float())
            top1 = (outs["fused"].argmax(-1) == outs["eager norms"].argmax(-1)).float().mean().item()
            print(f"  top-1 agreement {top1:.3f}", flush=True)
            graphs = {k: d.graphs[B][0] for k, d in decs.items()}
            ms = median_ms_interleaved({k: g.replay for k, g in graphs.items()}, dev, reps=20)
            print(f"context {ctx} x batch {B}: graph replay " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
                  + f"; logits rel diff {err:.2e}", flush=True)
            for k, g in graphs.items():
                counts = {}
                times = kernel_times(g.replay, 3, counts)
                print(f"  {k}: {sum(counts.values()):.0f} kernels per step, summed {sum(times.values()):.2f} ms")
                if k == "fused":
                    for name, v in sorted(times.items(), key=lambda kv: -kv[1])[:25]:
                        print(f"    {v * 1e3:9.1f} us/step {counts[name]:6.1f}x  {name[:110]}")
            del decs, graphs, cache
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
