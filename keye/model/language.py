"""The Keye-VL-2.0 language model body (``model.*``): embeddings, 48 decoder layers (DSA attention + MoE),
final RMSNorm. Works on packed token rows [T, hidden]; positions are M-RoPE ids [3, T]."""

from __future__ import annotations

import torch
import torch.nn as nn

import keye.ops
from keye.model.attention import Attention, AttentionContext
from keye.model.config import KeyeConfig
from keye.model.moe import SparseMoeBlock
from keye.model.norm import RMSNorm
from keye.model.rope import mrope_cos_sin


class DecoderLayer(nn.Module):
    def __init__(self, config: KeyeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoeBlock(config)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        norm = self.post_attention_layernorm  # x + attention, and its norm, in one kernel
        h, x = keye.ops.add_rms_norm(self.self_attn(self.input_layernorm(x), ctx), x, norm.weight, norm.eps)
        return x + self.mlp(h)


class LanguageModel(nn.Module):
    def __init__(self, config: KeyeConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def context(self, position_ids: torch.Tensor, mode: str, cu_seqlens=None, cache=None, step=None
                ) -> AttentionContext:
        c = self.config
        cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section, c.mrope_interleaved)
        # sglang's indexer uses the non-interleaved layout whatever the main attention's rope_scaling says
        icos, isin = mrope_cos_sin(position_ids, c.indexer_head_dim, c.rope_theta, c.indexer_mrope_section)
        bounds = cu_seqlens.tolist() if cu_seqlens is not None else None
        return AttentionContext(cos, sin, icos, isin, mode, cu_seqlens, bounds, cache, step)

    def forward(self, hidden: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden, ctx)
        return self.norm(hidden)


__all__ = ["LanguageModel", "DecoderLayer"]
