"""smart_resize: the size an image or video frame is resized to before the ViT.

Rule (keye-vl-utils 1.5.2 `smart_resize`, also used by sglang's Keye-VL-2.0 processor; docs/keye-vl-2.md §3.1):

1. Reject if max(h, w) / min(h, w) > 200 (MAX_ASPECT_RATIO).
2. Round each side to the nearest multiple of `factor` (Python `round`, i.e. ties to even), at least `factor`.
3. If the rounded area > max_pixels: beta = sqrt(h*w / max_pixels); each side = floor(side / beta) to a
   multiple of `factor`.
   Else if the rounded area < min_pixels: beta = sqrt(min_pixels / (h*w)); each side = ceil(side * beta) to
   a multiple of `factor`.
4. Each side is at least `factor`.

`factor` = ViT patch 14 x spatial merge 2 = 28, so one merged token covers a 28x28 pixel block and an image of
size (H, W) becomes (H/28)*(W/28) LM tokens. Defaults are the image limits of keye-vl-utils / sglang 2.0:
4 to 20480 tokens per image (min_pixels 3136, max_pixels 16,056,320). Video frames use their own per-frame
limits (64..256 tokens for 2.0, see keye.processor.chat).

Like the reference, nothing is clamped after step 3, so the bounds hold per branch only: the floor branch
never exceeds max_pixels but may end below min_pixels, the ceil branch never falls below min_pixels but may
exceed max_pixels (e.g. 62x743 with min = max = 64 tokens gives 84x784 = 84 tokens). Kept on purpose: these are
the sizes the released model was trained and is served with.
"""

import math

IMAGE_FACTOR = 28
MIN_TOKENS = 4
MAX_TOKENS = 20480
MIN_PIXELS = MIN_TOKENS * IMAGE_FACTOR * IMAGE_FACTOR  # 3,136
MAX_PIXELS = MAX_TOKENS * IMAGE_FACTOR * IMAGE_FACTOR  # 16,056,320
MAX_ASPECT_RATIO = 200


def _check_positive_int(name: str, value) -> None:
    # bool is an int subclass; a True height is a caller bug, not 1 pixel.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"smart_resize: {name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"smart_resize: {name} must be > 0, got {value}")


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Return (h, w), both multiples of `factor`, with h*w brought to [min_pixels, max_pixels] as the module
    doc describes, and the aspect ratio of (height, width) kept as closely as the grid allows."""
    for name, value in (("height", height), ("width", width), ("factor", factor),
                        ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        _check_positive_int(name, value)
    if min_pixels > max_pixels:
        raise ValueError(f"smart_resize: min_pixels ({min_pixels}) must be <= max_pixels ({max_pixels})")
    if max_pixels < factor * factor:
        raise ValueError(f"smart_resize: max_pixels ({max_pixels}) is below one {factor}x{factor} block")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"smart_resize: aspect ratio of {height}x{width} is {ratio:.1f}, must be <= {MAX_ASPECT_RATIO}")

    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return max(h, factor), max(w, factor)


def num_merged_tokens(height: int, width: int, factor: int = IMAGE_FACTOR) -> int:
    """LM tokens for an image already resized to (height, width): one per factor x factor block."""
    if height % factor or width % factor:
        raise ValueError(f"num_merged_tokens: size {height}x{width} is not a multiple of factor {factor}")
    return (height // factor) * (width // factor)
