"""mlp_AR: merge 2 x 2 neighbouring ViT patches into one LM token, then LayerNorm -> Linear -> GELU -> Linear.

Per image / frame grid (t, h, w) of raster-ordered features [t*h*w, D]:
``(t h p1 w p2) d -> (t h w) (p1 p2 d)`` with p1 = p2 = merge, giving [t*(h/2)*(w/2), 4D] in raster order of
the merged grid (the order of the <|image_pad|> / <|video_pad|> tokens).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def merge_patches(features: torch.Tensor, grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    out, start = [], 0
    D = features.shape[-1]
    for t, h, w in grids:
        n = t * h * w
        x = features[start:start + n].view(t, h // merge, merge, w // merge, merge, D)
        out.append(x.permute(0, 1, 3, 2, 4, 5).reshape(-1, merge * merge * D))
        start += n
    return torch.cat(out)


class Projector(nn.Module):
    def __init__(self, vision_hidden: int, lm_hidden: int, merge: int, eps: float):
        super().__init__()
        self.merge = merge
        d = vision_hidden * merge * merge
        self.pre_norm = nn.LayerNorm(d, eps=eps)
        self.linear_1 = nn.Linear(d, d)
        self.linear_2 = nn.Linear(d, lm_hidden)

    def forward(self, features: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        x = merge_patches(features, grids, self.merge)
        return self.linear_2(F.gelu(self.linear_1(self.pre_norm(x))))


__all__ = ["Projector", "merge_patches"]
