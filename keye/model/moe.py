"""The MoE block of every Keye-VL-2.0 decoder layer: router ``gate`` + 128 SwiGLU experts (no shared expert).

Experts are kept in the checkpoint's fused layout (``experts.gate_up_proj`` [E, hidden, 2I], gate columns first;
``experts.down_proj`` [E, I, hidden]) which is what keye.ops.moe takes; per-expert checkpoints are
converted on load (keye/model/checkpoint.py). For inference, ``Experts.pack()`` (or ``KeyeVL.pack_experts()``)
reorders gate_up's columns in place (keye.ops.moe_pack_gate_up) so the gate_up GEMM applies SwiGLU in its epilogue;
the state_dict still holds the checkpoint's order, and gradients need ``unpack()`` first.
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
        self.packed = False  # gate_up_proj's columns in keye.ops.moe_pack_gate_up's order (pack / unpack)
        self.register_state_dict_post_hook(_state_dict_in_checkpoint_order)
        self.register_load_state_dict_pre_hook(_load_into_packed)

    def pack(self) -> "Experts":
        """For inference: gate_up_proj's columns reordered in place (keye.ops.moe_pack_gate_up; the Parameter object
        stays, its storage is replaced) so keye.ops.moe runs SwiGLU in the gate_up GEMM's epilogue (Keye layer at
        16K tokens on the H200: ~5% faster; NOTES.md) and the decode kernels read the packed order. The state_dict
        keeps the checkpoint's order. Idempotent; needs 2I a multiple of 256."""
        if not self.packed:
            self.gate_up_proj.data = keye.ops.moe_pack_gate_up(self.gate_up_proj.detach())
            self.packed = True
        return self

    def unpack(self) -> "Experts":
        """Back to the checkpoint's order (needed before computing gradients). Idempotent."""
        if self.packed:
            self.gate_up_proj.data = keye.ops.moe_unpack_gate_up(self.gate_up_proj.detach())
            self.packed = False
        return self

    def gate_up_checkpoint_order(self, experts: slice = slice(None)) -> torch.Tensor:
        """gate_up_proj[experts] in the checkpoint's column order (a copy when packed, else a view)."""
        w = self.gate_up_proj.detach()[experts]
        return keye.ops.moe_unpack_gate_up(w) if self.packed else w


def _state_dict_in_checkpoint_order(module: Experts, state_dict, prefix: str, local_metadata) -> None:
    key = prefix + "gate_up_proj"
    if module.packed and key in state_dict:
        state_dict[key] = module.gate_up_checkpoint_order()


def _load_into_packed(module: Experts, state_dict, prefix: str, *args) -> None:
    """A checkpoint-order gate_up_proj loaded into packed experts is packed on the way in (a wrong shape is left to
    load_state_dict's own size check)."""
    key = prefix + "gate_up_proj"
    t = state_dict.get(key)
    if module.packed and t is not None and t.shape == module.gate_up_proj.shape:
        state_dict[key] = keye.ops.moe_pack_gate_up(t)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: KeyeConfig):
        super().__init__()
        self.top_k, self.renormalize = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]: softmax router, top-k, renormalised weights, weighted SwiGLU experts."""
        r = keye.ops.moe_router(self.gate(x), self.top_k, self.renormalize)
        return keye.ops.moe(x, r.weights, r.ids, self.experts.gate_up_proj, self.experts.down_proj,
                            gate_up_packed=self.experts.packed)


__all__ = ["SparseMoeBlock", "Experts"]
