"""The MoE block of every Keye-VL-2.0 decoder layer: router ``gate`` + 128 SwiGLU experts (no shared expert).

Experts are kept in the checkpoint's fused layout (``experts.gate_up_proj`` [E, hidden, 2I], gate columns first;
``experts.down_proj`` [E, I, hidden]) which is what keye.ops.moe takes; per-expert checkpoints are
converted on load (keye/model/checkpoint.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

import keye.ops
from keye.model.config import KeyeConfig


class Experts(nn.Module):
    def __init__(self, config: KeyeConfig):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))
        nn.init.normal_(self.gate_up_proj, std=H ** -0.5)
        nn.init.normal_(self.down_proj, std=I ** -0.5)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: KeyeConfig):
        super().__init__()
        self.top_k, self.renormalize = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]: softmax router, top-k, renormalised weights, weighted SwiGLU experts."""
        r = keye.ops.moe_router(self.gate(x), self.top_k, self.renormalize)
        return keye.ops.moe(x, r.weights, r.ids, self.experts.gate_up_proj, self.experts.down_proj)


__all__ = ["SparseMoeBlock", "Experts"]
