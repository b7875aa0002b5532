"""The last 2048-query chunk of a 32K-token prefill (H_I=16, D_I=64, top-2048): one score-kernel launch and one
top-k launch, for ncu:
    ncu --clock-control none -k regex:"indexer_logits|topk_rows" -c 2 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section MemoryWorkloadAnalysis python3 bench/profile_indexer.py"""
import torch

from keye import ops

T, H, D, ROWS, TOPK = 32768, 16, 64, 2048, 2048
q8, qs = ops.indexer_rotate_quantize(torch.randn(ROWS, H, D, device="cuda"))
k8, ks = ops.indexer_rotate_quantize(torch.randn(T, D, device="cuda"))
w = torch.randn(ROWS, H, device="cuda")
out = torch.empty(ROWS, T, device="cuda")
idx = torch.empty(ROWS, TOPK, dtype=torch.int32, device="cuda")
lengths = torch.arange(T - ROWS + 1, T + 1, dtype=torch.int32, device="cuda")
with ops.index_checks(False):
    torch.ops.keye.indexer_logits(q8, qs, w, k8, ks, T - ROWS, out)
    torch.ops.keye.topk_rows(out, lengths, TOPK, 0, idx)
torch.cuda.synchronize()
