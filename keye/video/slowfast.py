"""Keye-VL-1.5 SlowFast video encoding (optional; Keye-VL-2.0 serves every frame as slow).

Rule (keye-vl-utils 1.5.2 `extract_slow_fast_frames` / `fetch_video`, docs/keye-vl-2.md §3.2), written here in
torch so it runs where the frames are (GPU frames never visit the host):

Frame types. Every sampled frame is resized to at most 256 tokens (smart_resize, min 48 tokens; uint8 bilinear
antialiased resize), converted to HSV with OpenCV's 8-bit convention (H in [0, 180), S and V in [0, 255]) and cut
into 28 x 28 patches. A patch is *similar* to the same patch of the last slow frame when the cosine of their HSV
vectors is > 0.7; patches whose vectors are both ~zero (norm < 0.01) are left out. Frame 0 is slow; a frame whose
fraction of similar patches is < 0.9 (`min_frame_similarity`) becomes the new slow frame, otherwise it is fast.

Token budget. T = the first tokens-per-frame in [48, 768] (binary search, as the reference) with
n_slow * T + n_fast * max(int(0.3 * T), 48) > 65,536 tokens. Slow frames: smart_resize(min 48, max T tokens).
Fast frames: smart_resize(min 48, max max(int(0.3 * slow tokens), 48) tokens), slow tokens being the slow size's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from keye.processor.image import PatchLayout, resize_images, video_to_patches
from keye.processor.resize import smart_resize
from keye.video.preprocess import VideoInputs

FACTOR = 28
SIMILARITY_CHUNK = 32  # frames compared with the current key at once


@dataclass(frozen=True)
class SlowFastBudget:
    min_tokens: int = 48
    max_tokens: int = 768
    total_tokens: int = 65_536
    fast_ratio: float = 0.3
    min_frame_similarity: float = 0.9
    patch_similarity: float = 0.7
    similarity_max_tokens: int = 256

    def __post_init__(self):
        for name in ("min_tokens", "max_tokens", "total_tokens", "similarity_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SlowFastBudget: {name} must be a positive int, got {value!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"SlowFastBudget: min_tokens ({self.min_tokens}) > max_tokens ({self.max_tokens})")
        for name in ("fast_ratio", "min_frame_similarity", "patch_similarity"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"SlowFastBudget: {name} must be in (0, 1], got {value!r}")


def hsv_uint8(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB holding integer values 0..255 (any float dtype) -> HSV in OpenCV's 8-bit convention,
    float32, values rounded to integers: H = hue / 2 in [0, 180), S = 255 * (max - min) / max, V = max."""
    r, g, b = rgb.float().unbind(1)
    v, _ = torch.stack([r, g, b]).max(0)
    mn, _ = torch.stack([r, g, b]).min(0)
    delta = v - mn
    s = torch.where(v > 0, 255.0 * delta / v.clamp_min(1e-6), torch.zeros_like(v))
    safe = delta.clamp_min(1e-6)
    h = torch.where(v == r, 60.0 * (g - b) / safe,
                    torch.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h = torch.where(h < 0, h + 360.0, h)
    h = torch.round(h / 2) % 180
    return torch.stack([h, torch.round(s), v], dim=1)


def frame_similarity(key: torch.Tensor, frames: torch.Tensor, threshold: float = 0.7,
                     patch: int = FACTOR, eps: float = 1e-8) -> torch.Tensor:
    """Fraction of similar patches between one HSV frame `key` [3, H, W] and each of `frames` [N, 3, H, W]."""
    def patches(x):  # [N, 3, H, W] -> [N, h*w, 3*p*p]
        n, c, hh, ww = x.shape
        return x.reshape(n, c, hh // patch, patch, ww // patch, patch).permute(0, 2, 4, 1, 3, 5).reshape(
            n, (hh // patch) * (ww // patch), c * patch * patch)

    a, b = patches(key[None]), patches(frames)
    na, nb = a.norm(dim=-1) + eps, b.norm(dim=-1) + eps
    cos = (a / na[..., None] * (b / nb[..., None])).sum(-1)
    counted = ~((na < 0.01) & (nb < 0.01))
    similar = ((cos > threshold) & counted).float().sum(-1)
    return similar / counted.float().sum(-1)  # nan when no patch counts (as the reference: such a frame is fast)


def frame_types(frames: torch.Tensor, budget: SlowFastBudget = SlowFastBudget()) -> torch.Tensor:
    """uint8 [N, H, W, 3] frames (CPU or CUDA) -> int32 [N] on the same device: 0 = slow, 1 = fast."""
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 \
            or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError("frame_types: frames must be a non-empty uint8 torch tensor [N, H, W, 3], got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} {list(getattr(frames, 'shape', []))}")
    n, height, width = (int(s) for s in frames.shape[:3])
    h, w = smart_resize(height, width, factor=FACTOR, min_pixels=budget.min_tokens * FACTOR * FACTOR,
                        max_pixels=budget.similarity_max_tokens * FACTOR * FACTOR)
    hsv = hsv_uint8(resize_images(frames, h, w, "bilinear"))
    types = torch.ones(n, dtype=torch.int32, device=frames.device)
    key = 0
    types[0] = 0
    # Sequential by definition (each slow frame becomes the new reference). The frames after the current key are
    # compared with it a chunk at a time; the first one under the threshold becomes the next key.
    start = 1
    while start < n:
        stop = min(n, start + SIMILARITY_CHUNK)
        below = torch.nonzero(frame_similarity(hsv[key], hsv[start:stop], budget.patch_similarity)
                              < budget.min_frame_similarity)
        if below.numel() == 0:
            start = stop
            continue
        key = start + int(below[0, 0])
        types[key] = 0
        start = key + 1
    return types


def slowfast_sizes(num_slow: int, num_fast: int, height: int, width: int,
                   budget: SlowFastBudget = SlowFastBudget()) -> tuple[tuple[int, int], tuple[int, int]]:
    """((slow_h, slow_w), (fast_h, fast_w)) under the token budget (module doc)."""
    for name, value in (("num_slow", num_slow), ("num_fast", num_fast)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"slowfast_sizes: {name} must be an int >= 0, got {value!r}")
    if num_slow < 1:
        raise ValueError("slowfast_sizes: a video has at least one slow frame (its first)")
    lo, hi = budget.min_tokens, budget.max_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        used = num_slow * mid + num_fast * max(int(budget.fast_ratio * mid), budget.min_tokens)
        if used > budget.total_tokens:
            hi = mid
        else:
            lo = mid + 1
    min_pixels = budget.min_tokens * FACTOR * FACTOR
    slow = smart_resize(height, width, factor=FACTOR, min_pixels=min_pixels, max_pixels=lo * FACTOR * FACTOR)
    slow_tokens = (slow[0] // FACTOR) * (slow[1] // FACTOR)
    fast_max = max(int(slow_tokens * budget.fast_ratio), budget.min_tokens) * FACTOR * FACTOR
    fast = smart_resize(height, width, factor=FACTOR, min_pixels=min_pixels, max_pixels=fast_max)
    return slow, fast


@dataclass
class SlowFastInputs(VideoInputs):
    frame_types: torch.Tensor = None  # int32 [num_frames]: 0 slow, 1 fast


def to_model_inputs_slowfast(frames: torch.Tensor, timestamps, budget: SlowFastBudget = SlowFastBudget(),
                             layout: PatchLayout = PatchLayout()) -> SlowFastInputs:
    """Like keye.video.preprocess.to_model_inputs, with Keye-VL-1.5's slow/fast frame sizes; patches stay in
    frame order, each frame at its own size."""
    types = frame_types(frames, budget)
    n = int(frames.shape[0])
    ts = torch.as_tensor(np.asarray(timestamps.cpu() if isinstance(timestamps, torch.Tensor) else timestamps,
                                    dtype=np.float32), device=frames.device)
    if ts.shape != (n,):
        raise ValueError(f"to_model_inputs_slowfast: need one timestamp per frame ({n}), got {list(ts.shape)}")
    is_fast = types.cpu().numpy().astype(bool)  # n small ints: the sizes decide the layout, needed on the host
    slow, fast = slowfast_sizes(int((~is_fast).sum()), int(is_fast.sum()), int(frames.shape[1]),
                                int(frames.shape[2]), budget)
    p = layout.patch_size
    per_frame = [None] * n
    grids = torch.empty(n, 3, dtype=torch.long)
    for mask, (h, w) in ((~is_fast, slow), (is_fast, fast)):
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            continue
        patches, _ = video_to_patches(frames[torch.as_tensor(idx, device=frames.device)], h, w, layout)
        for j, chunk in zip(idx, patches.split((h // p) * (w // p))):
            per_frame[j] = chunk
        grids[idx] = torch.tensor([1, h // p, w // p])
    return SlowFastInputs(patches=torch.cat(per_frame), grid_thw=grids.to(frames.device), timestamps=ts,
                          frame_types=types)
