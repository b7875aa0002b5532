"""Microbenchmark of the MoE router on the Keye/Qwen3-30B-A3B shape (E=128, top-8, bf16 logits).

  kernel     torch.ops.keye.moe_router (weights, ids, counts, prob_sum)
  reference  keye.ops.reference.moe_router (the specification)
  baseline   transformers' Qwen3-MoE formulation: softmax(fp32) -> topk -> renormalise
             (no counts / prob sums, so it does less work than the op)
"""

from __future__ import annotations

import torch

from keye.bench.timing import median_ms, rel_err
from keye.ops import reference as ref

EXPERTS, TOP_K = 128, 8


def _baseline(logits):
    p = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, i = torch.topk(p, TOP_K, dim=-1)
    return w / w.sum(-1, keepdim=True), i


def run_case(T: int, device: torch.device, reps: int, on_gpu: bool) -> list[dict]:
    logits = torch.randn(T, EXPERTS, device=device, dtype=torch.bfloat16)
    want = ref.moe_router(logits, TOP_K)

    def check(out) -> bool:
        w, ids, counts, prob_sum = out
        return torch.equal(ids, want.ids) and torch.equal(counts, want.counts) \
            and rel_err(w, want.weights) < 1e-5 and rel_err(prob_sum, want.prob_sum) < 1e-5

    impl = (lambda: torch.ops.keye.moe_router(logits, TOP_K, True)) if on_gpu else (lambda: ref.moe_router(logits, TOP_K))
    rec = {"op": "moe_router", "tokens": T, "experts": EXPERTS, "top_k": TOP_K, "dtype": "bfloat16",
           "bytes": T * EXPERTS * 2 + T * TOP_K * 8, "check": "ok" if check(impl()) else "FAIL",
           "reference_ms": median_ms(lambda: ref.moe_router(logits, TOP_K), device, reps),
           "baseline_ms": median_ms(lambda: _baseline(logits), device, reps)}
    if on_gpu:
        rec["kernel_ms"] = median_ms(impl, device, reps)
    return [rec]
