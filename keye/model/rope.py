"""Rotary position embeddings: the LM's 3D M-RoPE (t/h/w sections) and the ViT's 2D RoPE (row/column).

Both use the rotate-half (NeoX) layout: channel j and j + D/2 form one rotating pair with frequency
inv_freq[j] = theta^(-2j/D). cos/sin are computed in fp32 the way the HF/sglang references do.
"""

from __future__ import annotations

import torch

from keye.ops.reference.norm import apply_rope, rotate_half  # noqa: F401  (the model's RoPE, re-exported)


def inverse_frequencies(dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2j/dim) for j < dim/2 (fp32)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def mrope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, sections: list[int],
                  interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] fp32 for position_ids [3, T] (rows t, h, w).

    Non-interleaved (Qwen2-VL / Keye): frequency j uses stream t for j < s0, h for s0 <= j < s0+s1, else w.
    Interleaved (Qwen3-VL): j % 3 == 1 -> h (j < 3*s1), j % 3 == 2 -> w (j < 3*s2), else t.
    For text all three rows are equal and this is plain 1D RoPE."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 3:
        raise ValueError(f"keye.mrope_cos_sin: position_ids must be [3, T], got {list(position_ids.shape)}")
    if sum(sections) * 2 != head_dim:
        raise ValueError(f"keye.mrope_cos_sin: sections {sections} must sum to head_dim/2 = {head_dim // 2}")
    inv = inverse_frequencies(head_dim, theta, position_ids.device)
    freqs = position_ids.float().unsqueeze(-1) * inv  # [3, T, D/2]
    half = head_dim // 2
    j = torch.arange(half, device=position_ids.device)
    if interleaved:  # torch.where, not masked assignment: no host sync (CUDA-graph capturable)
        stream = torch.where((j % 3 == 1) & (j < 3 * sections[1]), 1, 0)
        stream = torch.where((j % 3 == 2) & (j < 3 * sections[2]), 2, stream)
    else:
        stream = (j >= sections[0]).long() + (j >= sections[0] + sections[1]).long()
    f = freqs.gather(0, stream.view(1, 1, half).expand(1, freqs.shape[1], half)).squeeze(0)  # [T, D/2]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def vision_rope_cos_sin(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] fp32 of the ViT's 2D RoPE for patches at (rows, cols) [N].

    head_dim/4 frequencies over dim head_dim/2; the first half of each rotating half follows the row,
    the second the column (cat(h*f, w*f), duplicated)."""
    inv = inverse_frequencies(head_dim // 2, theta, rows.device)
    f = torch.cat([rows.float().unsqueeze(-1) * inv, cols.float().unsqueeze(-1) * inv], dim=-1)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


__all__ = ["inverse_frequencies", "mrope_cos_sin", "vision_rope_cos_sin", "rotate_half", "apply_rope"]
