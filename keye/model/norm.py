"""RMSNorm as in Qwen3: normalise in fp32, scale by the weight in the input dtype (keye.ops.rms_norm)."""

from __future__ import annotations

import torch
import torch.nn as nn

import keye.ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return keye.ops.rms_norm(x, self.weight, self.eps)


__all__ = ["RMSNorm"]
