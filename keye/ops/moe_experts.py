"""The routed experts of an MoE block: route -> permute -> grouped GEMMs (SwiGLU) -> weighted combine.

    r = keye.ops.moe_router(router_logits, top_k=8)
    out = keye.ops.moe_experts(x, r.weights, r.ids, gate_up, down)

On CUDA with bf16 this chains keye's routing/permutation kernels with torch._grouped_mm for the two
grouped GEMMs (keye's own grouped GEMM is still to come); elsewhere it runs the reference
(keye/ops/reference/moe_experts.py). Differentiable in x, weights, gate_up and down.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye.ops import reference as ref
from keye.ops._dispatch import use_kernel
from keye.ops.moe_permute import moe_permute, moe_route, moe_unpermute
from keye.ops.reference.moe_experts import check_experts_args

GROUP_ALIGN = 16  # rows per expert segment padded to this (TMA-friendly group starts for the grouped GEMM)


def _fast_path_ok(x, gate_up, down) -> bool:
    return (use_kernel(x, gate_up, down) and hasattr(torch, "_grouped_mm")
            and x.dtype == gate_up.dtype == down.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """x [T, H], weights/ids [T, K] (ids -1 = not routed), gate_up [E, H, 2I], down [E, I, H] -> [T, H]."""
    if not _fast_path_ok(x, gate_up, down):
        return ref.moe_experts(x, weights, ids, gate_up, down)
    check_experts_args(x, weights, ids, gate_up, down)
    E, I = down.shape[0], down.shape[1]
    routing = moe_route(ids, E, GROUP_ALIGN)
    ends = routing.offsets[1:]
    xs = moe_permute(x, routing.dest, routing.src)
    h = torch._grouped_mm(xs, gate_up, offs=ends)
    a = F.silu(h[:, :I]) * h[:, I:]
    y = torch._grouped_mm(a, down, offs=ends)
    return moe_unpermute(y, routing.dest, weights)
