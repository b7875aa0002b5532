"""RMSNorm, LayerNorm and rotate-half RoPE as Qwen3 / Keye compute them: the specification of keye.ops.rms_norm,
add_rms_norm, rms_norm_rope and layer_norm_rope.

RMSNorm normalises in fp32, rounds to the input dtype, then multiplies by the weight in that dtype (so a bf16
model rounds twice). RoPE (NeoX rotate-half layout) pairs channel j with j + D/2 and is computed in fp32:
x * cos + rotate_half(x) * sin, rounded to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype) over x's last dim."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a decoder layer's residual add and the next norm in one."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] (or [T, D]) rotated by cos/sin [T, D]; computed in fp32, returned in x's dtype."""
    if x.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                  ) -> torch.Tensor:
    """Per-head RMSNorm then RoPE: x [T, H, D], weight [D], cos / sin [T, D] fp32 (Qwen3's q_norm / k_norm)."""
    return apply_rope(rms_norm(x, weight, eps), cos, sin)


def layer_norm_rope(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """LayerNorm of x.float() (fp32 weight and bias), then RoPE, all in fp32: x [T, H, D] -> fp32 [T, H, D] (the DSA
    indexer's key path)."""
    return apply_rope(F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps), cos, sin)


__all__ = ["rms_norm", "add_rms_norm", "rotate_half", "apply_rope", "rms_norm_rope", "layer_norm_rope"]
