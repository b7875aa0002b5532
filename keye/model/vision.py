"""The Keye SigLIP NaViT vision encoder (released names under ``visual.vision_model.*``).

Input: pixel patches [N, C, P, P] in plain raster order per image / video frame (t, gh, gw) and grid_thw [G, 3]
(frames per entry, patch rows, patch columns). Each frame is its own attention segment; the learned 27 x 27
position embedding is bilinearly interpolated to the frame's (gh, gw) grid, and the attention adds a 2D RoPE
of the patch's (row, column).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keye.model.config import VisionConfig
from keye.model.rope import apply_rope, vision_rope_cos_sin
from keye.processor.positions import check_grid_thw


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.position_grid ** 2, cfg.hidden_size)
        # In the checkpoint; only used by the packing mode (interpolate_pos_encoding=False) no inference path uses,
        # so a checkpoint without it loads too (the loader then drops it).
        self.packing_position_embedding = nn.Embedding(cfg.num_packing_positions, cfg.hidden_size)

    def interpolated_positions(self, h: int, w: int) -> torch.Tensor:
        """The learned grid bilinearly resized (align_corners=False) to h x w patches: [h*w, D] raster order."""
        g = self.cfg.position_grid
        grid = self.position_embedding.weight.view(g, g, -1).permute(2, 0, 1).unsqueeze(0)
        out = F.interpolate(grid.float(), size=(h, w), mode="bilinear", align_corners=False)
        return out.squeeze(0).flatten(1).t().to(self.position_embedding.weight.dtype)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = F.linear(patches.flatten(1).to(w.dtype), w.flatten(1), self.patch_embedding.bias)  # conv k=s=P
        pos = [self.interpolated_positions(h, ww).repeat(t, 1) for t, h, ww in grids]
        return x + torch.cat(pos)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, cos, sin, grids):
        N = x.shape[0]
        q = apply_rope(self.q_proj(x).view(N, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(N, self.heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(N, self.heads, self.head_dim)
        out, start = [], 0
        for t, h, w in grids:  # all frames of one entry share a size: one batched call, one segment per frame
            n = t * h * w
            qs, ks, vs = (z[start:start + n].view(t, h * w, self.heads, self.head_dim).transpose(1, 2)
                          for z in (q, k, v))
            out.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(n, -1))
            start += n
        return self.out_proj(torch.cat(out))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, grids):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, grids)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """patches [N, C, P, P] -> features [N, D] (same raster order)."""
        cfg = self.cfg
        grids = check_grid_thw(grid_thw, "grid_thw", cfg.spatial_merge_size, "keye.model")
        n = sum(t * h * w for t, h, w in grids)
        if not isinstance(patches, torch.Tensor) or patches.dim() != 4 or \
                tuple(patches.shape[1:]) != (cfg.num_channels, cfg.patch_size, cfg.patch_size):
            raise ValueError(f"keye.model.vision: 'pixel_values' must be [N, {cfg.num_channels}, {cfg.patch_size}, "
                             f"{cfg.patch_size}], got {getattr(patches, 'shape', type(patches).__name__)}")
        if patches.shape[0] != n:
            raise ValueError(f"keye.model.vision: 'pixel_values' has {patches.shape[0]} patches but grid_thw "
                             f"{[list(g) for g in grids]} describes {n}")
        dev = patches.device
        rows = torch.cat([torch.arange(h, device=dev).repeat_interleave(w).repeat(t) for t, h, w in grids])
        cols = torch.cat([torch.arange(w, device=dev).repeat(h * t) for t, h, w in grids])
        cos, sin = vision_rope_cos_sin(rows, cols, cfg.head_dim, cfg.rope_theta)
        x = self.embeddings(patches, grids)
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, grids)
        return self.post_layernorm(x)


class Visual(nn.Module):
    """Holds ``vision_model`` so that parameter names match the checkpoint's ``visual.vision_model.*``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = VisionTransformer(cfg)

    def forward(self, patches, grid_thw):
        return self.vision_model(patches, grid_thw)


__all__ = ["Visual", "VisionTransformer"]
