"""Per-frame size of a video under Keye-VL-2.0's token budget (sglang `fetch_video`, all frames slow;
docs/keye-vl-2.md §3.3).

Defaults: 64..256 tokens per frame, 184,320 tokens per video (split equally when a request holds several
videos). The rule, in tokens (one token = a 28 x 28 pixel block):

1. Search T in [min_tokens, max_tokens] for the smallest T with nframes * T > total (binary search as in the
   reference); T = max_tokens if even nframes * max_tokens fits, T = min_tokens if nframes * min_tokens is
   already over.
2. Every frame gets smart_resize(h, w, min_pixels = min_tokens * 28^2, max_pixels = T * 28^2).

So up to 720 frames get up to 256 tokens each. The reference's search picks the first T that *exceeds* the
budget, so once nframes * max_tokens > total the cap per frame is floor(total / nframes) + 1 and a video may use
up to nframes tokens more than `total` (1000 frames: cap 185, not 184; 2880 frames: cap 65, not 64). Frames so
small that smart_resize takes its ceil branch (rounded area under 64 tokens) may also land above T (see
keye.processor.resize). Both are kept on purpose: the model was trained and is served with these sizes.
Frame *sampling* (2 fps, 2..2880 frames) belongs to the video reader (keye.video), not here.
"""

from dataclasses import dataclass

from keye.processor.resize import IMAGE_FACTOR, smart_resize


@dataclass(frozen=True)
class VideoBudget:
    min_tokens_per_frame: int = 64
    max_tokens_per_frame: int = 256
    total_tokens: int = 184_320

    def __post_init__(self):
        for name in ("min_tokens_per_frame", "max_tokens_per_frame", "total_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"VideoBudget: {name} must be a positive int, got {value!r}")
        if self.min_tokens_per_frame > self.max_tokens_per_frame:
            raise ValueError(f"VideoBudget: min_tokens_per_frame ({self.min_tokens_per_frame}) > "
                             f"max_tokens_per_frame ({self.max_tokens_per_frame})")


def max_tokens_per_frame(num_frames: int, budget: VideoBudget = VideoBudget(), num_videos: int = 1) -> int:
    """The per-frame token cap T of step 1 for a video of `num_frames` frames."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
        raise ValueError(f"max_tokens_per_frame: num_frames must be a positive int, got {num_frames!r}")
    if isinstance(num_videos, bool) or not isinstance(num_videos, int) or num_videos <= 0:
        raise ValueError(f"max_tokens_per_frame: num_videos must be a positive int, got {num_videos!r}")
    # The reference compares pixels: nframes * mid * 28^2 > int(total * 28^2 / num_videos). For integers that
    # is exactly nframes * mid * num_videos > total, which avoids floats.
    lo, hi = budget.min_tokens_per_frame, budget.max_tokens_per_frame
    while lo < hi:
        mid = (lo + hi) // 2
        if num_frames * mid * num_videos > budget.total_tokens:
            hi = mid
        else:
            lo = mid + 1
    return lo


def video_frame_size(num_frames: int, height: int, width: int, budget: VideoBudget = VideoBudget(),
                     num_videos: int = 1, factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    """(h, w) every frame of the video is resized to (multiples of `factor`)."""
    cap = max_tokens_per_frame(num_frames, budget, num_videos)
    return smart_resize(height, width, factor=factor,
                        min_pixels=budget.min_tokens_per_frame * factor * factor,
                        max_pixels=cap * factor * factor)
