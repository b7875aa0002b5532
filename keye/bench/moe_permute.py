"""Microbenchmark of the MoE permutation ops on Qwen3-30B-A3B shapes (H=2048, E=128, top-8).

Each case first checks the op against its reference on the same inputs, then times:
  kernel      torch.ops.keye.* (GPU only)
  reference   keye.ops.reference.* (the PyTorch specification)
  baseline    the strongest plain-PyTorch formulation with routing precomputed:
              permute   = x.index_select(0, src // K)            (one gather kernel)
              unpermute = torch.bmm(weights, y[dest].view(T,K,H)) (gather + batched GEMV)
Bytes are the fewest each op must move (every input read once, every output written once).
"""

from __future__ import annotations

import torch

from keye import ops
from keye.bench.timing import median_ms, rel_err
from keye.ops import reference as ref

HIDDEN, EXPERTS, TOP_K = 2048, 128, 8


def _inputs(T: int, device: torch.device):
    logits = torch.randn(T, EXPERTS, device=device)
    ids = logits.topk(TOP_K, dim=1).indices.int()
    weights = torch.softmax(logits.gather(1, ids.long()), dim=1)
    x = torch.randn(T, HIDDEN, device=device, dtype=torch.bfloat16)
    return ids, weights, x


def run_case(T: int, device: torch.device, reps: int, on_gpu: bool) -> list[dict]:
    """One token count: route, permute, unpermute. Returns one record per op."""
    ids, weights, x = _inputs(T, device)
    routing = ref.moe_route(ids, EXPERTS, 1)
    n_rows = routing.src.numel()
    gather_idx = (routing.src.long() // TOP_K)  # align=1, every slot routed: no padding rows
    y = torch.randn(n_rows, HIDDEN, device=device, dtype=torch.bfloat16)
    d_long = routing.dest.long().reshape(-1)
    esz = x.element_size()

    cases = {
        "moe_route": dict(
            kernel=lambda: torch.ops.keye.moe_route(ids, EXPERTS, 1),
            reference=lambda: ref.moe_route(ids, EXPERTS, 1),
            baseline=None,
            check=lambda out: all(torch.equal(a, b) for a, b in zip(out, routing)),
            bytes=ids.numel() * 4 * 2 + n_rows * 4),
        "moe_permute": dict(
            kernel=lambda: torch.ops.keye.moe_permute(x, routing.dest, routing.src, None),
            reference=lambda: ref.moe_permute(x, routing.dest, routing.src),
            baseline=lambda: x.index_select(0, gather_idx),
            check=lambda out: torch.equal(out, x.index_select(0, gather_idx)),
            bytes=(T + n_rows) * HIDDEN * esz),
        "moe_unpermute": dict(
            kernel=lambda: torch.ops.keye.moe_unpermute(y, routing.dest, weights),
            reference=lambda: ref.moe_unpermute(y, routing.dest, weights),
            baseline=lambda: torch.bmm(weights.to(y.dtype).unsqueeze(1),
                                       y.index_select(0, d_long).view(T, TOP_K, HIDDEN)).squeeze(1),
            check=lambda out: rel_err(out, ref.moe_unpermute(y.float(), routing.dest, weights)) < 1e-2,
            bytes=(n_rows + T) * HIDDEN * esz),
    }
    records = []
    with ops.index_checks(False):  # time the ops, not the optional host-synced range checks
        for name, c in cases.items():
            rec = {"op": name, "tokens": T, "hidden": HIDDEN, "experts": EXPERTS, "top_k": TOP_K,
                   "dtype": "bfloat16", "bytes": c["bytes"]}
            impl = c["kernel"] if on_gpu else c["reference"]
            rec["check"] = "ok" if c["check"](impl()) else "FAIL"
            rec["reference_ms"] = median_ms(c["reference"], device, reps)
            if on_gpu:
                rec["kernel_ms"] = median_ms(c["kernel"], device, reps)
            if c["baseline"] is not None:
                rec["baseline_ms"] = median_ms(c["baseline"], device, reps)
            records.append(rec)
    return records
