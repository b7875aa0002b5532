"""Decoded frames -> the ViT's video inputs, on the frames' own device (GPU frames never visit the host).

Sizes follow Keye-VL-2.0's token budget (keye.processor.budget: 64..256 tokens per frame, 184,320 per video, one
size for all frames); resizing, normalisation (mean = std = 0.5) and patchify are the processor's own
(keye.processor.image.video_to_patches), so the result is exactly what KeyeProcessor builds from the same frames:

    patches     float32 [P, 3, 14, 14]   raster order per frame, frames in order (`.flatten(1)`: rows of 588)
    grid_thw    int64 [num_frames, 3]    (1, h/14, w/14) per frame: every frame is its own grid
    timestamps  float32 [num_frames]     seconds, as printed in the prompt (`<|frame|>` + "%.1f")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from keye.processor.budget import VideoBudget, video_frame_size
from keye.processor.image import PatchLayout, video_to_patches


@dataclass
class VideoInputs:
    patches: torch.Tensor
    grid_thw: torch.Tensor
    timestamps: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """LM placeholder tokens of the whole video (merged 2x2)."""
        return int(self.patches.shape[0]) // 4


# Keye-VL-2.0's optional duration-adaptive budget (sglang env ENABLE_ADAPTIVE_VIDEO_TOKEN, single video only;
# docs/keye-vl-2.md §3.3): the video's total token budget is scaled by the first factor whose duration bound
# (seconds) is not exceeded. The paper's figures differ (256 s -> 0.125x ... 2048 s -> 1x); these are the code's.
ADAPTIVE_BUDGET_STEPS = ((259, 0.09), (518, 0.18), (1036, 0.36), (2016, 0.7))


def adaptive_budget(duration_s: float, budget: VideoBudget = VideoBudget()) -> VideoBudget:
    """`budget` with total_tokens scaled for a video of `duration_s` seconds (see ADAPTIVE_BUDGET_STEPS)."""
    if not isinstance(duration_s, (int, float)) or not np.isfinite(duration_s) or duration_s < 0:
        raise ValueError(f"adaptive_budget: duration_s must be a finite number >= 0, got {duration_s!r}")
    scale = next((f for bound, f in ADAPTIVE_BUDGET_STEPS if duration_s <= bound), 1.0)
    return VideoBudget(budget.min_tokens_per_frame, budget.max_tokens_per_frame,
                       max(1, int(budget.total_tokens * scale)))


def frame_size(num_frames: int, height: int, width: int, budget: VideoBudget = VideoBudget(),
               num_videos: int = 1, layout: PatchLayout = PatchLayout()) -> tuple[int, int]:
    """(h, w) every frame is resized to."""
    return video_frame_size(num_frames, height, width, budget, num_videos, layout.factor)


def to_model_inputs(frames: torch.Tensor, timestamps, *, budget: VideoBudget = VideoBudget(), num_videos: int = 1,
                    layout: PatchLayout = PatchLayout(), size: tuple[int, int] | None = None) -> VideoInputs:
    """uint8 [N, H, W, 3] frames (CPU or CUDA) + N timestamps -> VideoInputs on the frames' device.
    `size` overrides the budgeted (h, w) (both multiples of 28)."""
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 \
            or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError("to_model_inputs: frames must be a non-empty uint8 torch tensor [N, H, W, 3], got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} {list(getattr(frames, 'shape', []))}")
    n, height, width = (int(s) for s in frames.shape[:3])
    if isinstance(timestamps, torch.Tensor):
        ts = timestamps.to(device=frames.device, dtype=torch.float32)
    else:
        ts = torch.as_tensor(np.asarray(timestamps, dtype=np.float32), device=frames.device)
    if ts.shape != (n,):
        raise ValueError(f"to_model_inputs: need one timestamp per frame ({n}), got shape {list(ts.shape)}")
    h, w = frame_size(n, height, width, budget, num_videos, layout) if size is None else size
    if h % layout.factor or w % layout.factor or h <= 0 or w <= 0:
        raise ValueError(f"to_model_inputs: size must be positive multiples of {layout.factor}, got {(h, w)}")
    patches, grids = video_to_patches(frames, h, w, layout)
    p = layout.patch_size
    grid = torch.tensor([1, h // p, w // p], dtype=torch.long, device=frames.device).expand(n, 3).contiguous()
    assert len(grids) == n and tuple(grids[0]) == (1, h // p, w // p)
    return VideoInputs(patches=patches, grid_thw=grid, timestamps=ts)
