"""A decode step of the full Keye-VL-2.0-30B-A3B model against its older code paths, in one process, on a CUDA GPU.

    python bench/decode_step_ab.py 131072x1 8192x16      # CONTEXTxBATCH

Random bf16 weights and random caches (as bench/profile_decode_step.py), one new token per sequence, each variant
captured as its own CUDA graph (GraphedDecoder) and replayed round-robin with the L2 flushed:
  fused        the model as it is: norm kernels (keye.ops.rms_norm, add_rms_norm, rms_norm_rope,
               layer_norm_rope), packed input projections (one GEMM per layer for q, k, v, indexer q and k) and
               the indexer's selection from candidate lists at long contexts (keye.ops.dsa_indexer.decode_uses_lists)
  no lists     the same with the indexer's earlier top-k paths (split chain, or group maxima from 64 rows)
  unpacked     the norm kernels, one GEMM per projection
  eager norms  the norms' PyTorch references (what the model ran before) and one GEMM per projection
Also prints each variant's eager step, its kernels per step, the fused step's largest kernels, and how far the
variants' logits are apart (random weights amplify last-bit differences through near-tied top-k choices).
Numbers: NOTES.md ("Model decode step"): the twenty-seventh session's measured as .ab/s27/step_ab.py (the same
steps before this file's refactor into functions), the twenty-eighth session's with this file.
"""
import os
import sys

os.environ["KEYE_INDEX_CHECKS"] = "0"
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_decode_step import full_model, host_ms, print_top_kernels, random_cache, shapes_from_argv  # noqa: E402
from profile_kernels import kernel_times  # noqa: E402

import keye.model.attention as attention_module  # noqa: E402
import keye.ops  # noqa: E402
import keye.ops.dsa_indexer as dsa_indexer_ops  # noqa: E402
from keye.bench.timing import median_ms_interleaved, rel_err  # noqa: E402
from keye.model.cuda_graph import GraphedDecoder  # noqa: E402
from keye.ops import reference as ref  # noqa: E402

FUSED = {n: getattr(keye.ops, n) for n in ("rms_norm", "add_rms_norm", "rms_norm_rope", "layer_norm_rope")}
PACKED = attention_module._packed_weight
LISTS = dsa_indexer_ops.LISTS_MIN_KEYS_PER_TOPK
VARIANTS = (("fused", True, True, True), ("no lists", True, True, False), ("unpacked", True, False, False),
            ("eager norms", False, False, False))


def use(fused: bool, packed: bool = True, lists: bool = True):
    """Route the model through the norm kernels or their references, the packed GEMM or one per projection, the
    indexer's candidate lists or its earlier top-k paths."""
    for n, f in FUSED.items():
        setattr(keye.ops, n, f if fused else getattr(ref, n))
    attention_module._packed_weight = PACKED if packed else (lambda linears: None)
    dsa_indexer_ops.LISTS_MIN_KEYS_PER_TOPK = LISTS if lists else 1 << 40


def compare_shape(model, cfg, ctx, B):
    cache, seqs = random_cache(cfg, ctx, B)
    step = cache.prepare(seqs, 1)
    ids = torch.randint(0, 100000, (B,), device="cuda")
    pos = torch.full((3, B), ctx, dtype=torch.long, device="cuda")
    decs, outs = {}, {}
    for name, fused, packed, lists in VARIANTS:
        use(True, True)
        decs[name] = GraphedDecoder(model, cache)  # packs (once): only then switch the variant's paths
        use(fused, packed, lists)
        outs[name] = decs[name](step, ids, pos)
        ms = host_ms(lambda: model(inputs_embeds=model.model.embed_tokens(ids), position_ids=pos, cache=cache,
                                   step=step, logits="last", attention_mode="sparse"), 1, 3)
        print(f" {ctx}x{B} {name}: eager step (host-bound) {ms:.2f} ms", flush=True)
    use(True, True)
    err = rel_err(outs["fused"].float(), outs["eager norms"].float())
    top1 = (outs["fused"].argmax(-1) == outs["eager norms"].argmax(-1)).float().mean().item()
    print(f"  top-1 agreement {top1:.3f}", flush=True)
    graphs = {k: d.graphs[B][0] for k, d in decs.items()}
    ms = median_ms_interleaved({k: g.replay for k, g in graphs.items()}, torch.device("cuda"), reps=20)
    print(f"context {ctx} x batch {B}: graph replay " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
          + f"; logits rel diff {err:.2e}", flush=True)
    for k, g in graphs.items():
        counts = {}
        times = kernel_times(g.replay, 3, counts)
        print(f"  {k}: {sum(counts.values()):.0f} kernels per step, summed {sum(times.values()):.2f} ms")
        if k == "fused":
            print_top_kernels(times, counts, 25)


def main():
    cfg, model = full_model()
    with torch.no_grad():
        for ctx, B in shapes_from_argv([(131072, 1), (8192, 16)]):
            compare_shape(model, cfg, ctx, B)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
