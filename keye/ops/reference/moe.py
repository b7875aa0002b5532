"""Specification of the routed-expert computation of a Qwen3-MoE / Keye-VL-2.0 block (SwiGLU experts).

    out[t] = sum_k weights[t, k] * expert(ids[t, k], x[t])
    expert(e, x) = (silu(x @ W_gu[e][:, :I]) * (x @ W_gu[e][:, I:])) @ W_down[e]

with the checkpoint's fused layout: gate_up [E, H, 2I] ("x @ W": first I columns gate, last I up) and
down [E, I, H]. ids == -1 marks a slot that is not routed. The reference loops over experts in fp32 and
rounds the result once to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye.ops._checks import check_index_range, check_same_device, check_size, check_tensor

FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def check_experts_args(x, weights, ids, gate_up, down, op="moe") -> None:
    check_tensor(x, op, "x", FLOATS, 2, "[T, H]")
    T, H = x.shape
    check_tensor(weights, op, "weights", FLOATS, 2, "[T, top_k]")
    check_tensor(ids, op, "ids", (torch.int32, torch.int64), 2, "[T, top_k]")
    check_tensor(gate_up, op, "gate_up", FLOATS, 3, "[E, H, 2*I]")
    check_tensor(down, op, "down", FLOATS, 3, "[E, I, H]")
    for name, t in (("weights", weights), ("ids", ids), ("gate_up", gate_up), ("down", down)):
        check_same_device(t, x, op, name, "x")
    check_size(weights, 0, T, op, "weights", "the token count (x.size(0))")
    if ids.shape != weights.shape:
        raise ValueError(f"keye.{op}: argument 'ids' must have the shape of 'weights' {list(weights.shape)}, "
                         f"got {list(ids.shape)}")
    E, I2 = gate_up.shape[0], gate_up.shape[2]
    check_size(gate_up, 1, H, op, "gate_up", "the hidden size (x.size(1))")
    if I2 % 2:
        raise ValueError(f"keye.{op}: 'gate_up' last dim must be 2*I (gate then up), got {I2}")
    if tuple(down.shape) != (E, I2 // 2, H):
        raise ValueError(f"keye.{op}: argument 'down' must have shape {[E, I2 // 2, H]}, got {list(down.shape)}")
    check_index_range(ids, -1, E - 1, op, "ids")


def moe(x, weights, ids, gate_up, down) -> torch.Tensor:
    check_experts_args(x, weights, ids, gate_up, down)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    I = down.shape[1]
    for e in torch.unique(ids[ids >= 0]).tolist():
        t, k = (ids == e).nonzero(as_tuple=True)
        h = x[t].float() @ gate_up[e].float()
        y = (F.silu(h[:, :I]) * h[:, I:]) @ down[e].float()
        out.index_add_(0, t, y * weights[t, k].float().unsqueeze(1))
    return out.to(x.dtype)
