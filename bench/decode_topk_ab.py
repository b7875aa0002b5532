"""Decode selection, three top-k paths in one process (H_I=16, D_I=64, top-2048, one query per sequence):
the split chain (plain streaming score kernel + topk_rows), the group-maximum path (the score kernel also
writing every 8 scores' maximum + topk_rows bounded by them) and the candidate lists (indexer_topk_paged: each
score-kernel CTA lists its own candidates, one CTA per row selects from the lists), plus the score kernel alone
with and without the maxima and keye.ops.indexer_topk_decode as shipped. CUDA graphs, timed round-robin with the
L2 flushed; the paths' indices and scores are compared with the split chain's. The twenty-first to twenty-eighth
sessions' tables in README.md and NOTES.md come from it:
    python3 bench/decode_topk_ab.py [BATCHxCONTEXT,...]      (default: the cases below)"""
import sys

import torch
from keye import ops
from keye.bench.dsa_indexer import paged_cache, H_I, D_I, TOPK
from keye.bench.timing import capture_graph, median_ms_interleaved, copy_bandwidth_gbs

dev = torch.device("cuda")
copy = copy_bandwidth_gbs(dev)
print(f"copy {copy:.0f} GB/s")
K = torch.ops.keye
cases = [(1, 32768), (8, 32768), (64, 32768), (1, 65536), (64, 65536), (1, 131072), (8, 131072), (32, 131072),
         (64, 131072), (128, 131072)]
if len(sys.argv) > 1:
    cases = [tuple(int(v) for v in case.split("x")) for case in sys.argv[1].split(",")]
for B, ctx in cases:
    k_cache, k_scale_cache, block_table = paged_cache(B, ctx, dev)
    q8, qs = ops.indexer_rotate_quantize(torch.randn(B, 1, H_I, D_I, device=dev, dtype=torch.bfloat16))
    w = torch.randn(B, 1, H_I, device=dev)
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    cols = block_table.shape[1] * 64
    buf = torch.empty(B, cols, device=dev)
    gm = torch.empty(B, cols // 8, device=dev)
    outs = {k: (torch.empty(B, TOPK, dtype=torch.int32, device=dev), torch.empty(B, TOPK, device=dev))
            for k in ("split", "grouped", "lists")}
    with ops.index_checks(False):
        g = {"split": capture_graph(
                 lambda: K.indexer_logits_paged(q8, qs, w, k_cache, k_scale_cache, block_table, seq_lens, buf),
                 lambda: K.topk_rows(buf, seq_lens, TOPK, 0, *outs["split"])),
             "grouped": capture_graph(
                 lambda: K.indexer_logits_paged(q8, qs, w, k_cache, k_scale_cache, block_table, seq_lens, buf, gm),
                 lambda: K.topk_rows(buf, seq_lens, TOPK, 0, *outs["grouped"], gm)),
             "lists": capture_graph(
                 lambda: K.indexer_topk_paged(q8, qs, w, k_cache, k_scale_cache, block_table, seq_lens, TOPK, buf,
                                              *outs["lists"])),
             "scores": capture_graph(
                 lambda: K.indexer_logits_paged(q8, qs, w, k_cache, k_scale_cache, block_table, seq_lens, buf)),
             "scores+gm": capture_graph(
                 lambda: K.indexer_logits_paged(q8, qs, w, k_cache, k_scale_cache, block_table, seq_lens, buf, gm)),
             "op": capture_graph(
                 lambda: ops.indexer_topk_decode(q8, qs, w, k_cache, k_scale_cache, block_table, seq_lens, TOPK))}
        for gr in g.values():
            gr.replay()
        torch.cuda.synchronize()
        same = all(torch.equal(outs["split"][i], outs[k][i]) for k in ("grouped", "lists") for i in (0, 1))
        t = median_ms_interleaved({k: v.replay for k, v in g.items()}, dev, reps=40)
    nbytes = B * ctx * (D_I + 4)
    pct = {k: nbytes / t[k] / 1e6 / copy * 100 for k in ("split", "grouped", "lists", "op")}
    print(f"B{B:>4} ctx {ctx:>6} same={same} " + " ".join(f"{k} {v * 1e3:6.1f}" for k, v in t.items()) +
          " us | % copy: " + " ".join(f"{k} {v:.1f}" for k, v in pct.items()), flush=True)
    del k_cache, k_scale_cache, block_table, buf, gm, g
    torch.cuda.empty_cache()
