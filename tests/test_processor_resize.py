"""smart_resize and the video token budget (docs/keye-vl-2.md §3.1, §3.3)."""

import ast
import importlib.metadata
import math
import random

import pytest

from keye.processor.budget import VideoBudget, max_tokens_per_frame, video_frame_size
from keye.processor.resize import MAX_PIXELS, MIN_PIXELS, num_merged_tokens, smart_resize

TOK = 28 * 28


def reference_smart_resize():
    """keye-vl-utils 1.5.2's own smart_resize, taken from its source file without importing the package (it
    imports torchvision/cv2/decord at module level): only the constants and pure helpers are executed."""
    try:
        files = importlib.metadata.files("keye-vl-utils") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("keye-vl-utils not installed (pip install --no-deps keye-vl-utils==1.5.2)")
    source = next((f for f in files if f.name == "vision_process.py"), None)
    if source is None:
        pytest.skip("keye-vl-utils has no vision_process.py")
    tree = ast.parse(source.locate().read_text())
    wanted = {"round_by_factor", "ceil_by_factor", "floor_by_factor", "smart_resize"}
    keep = [n for n in tree.body
            if (isinstance(n, ast.FunctionDef) and n.name in wanted)
            or (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets)
                and isinstance(n.value, (ast.Constant, ast.BinOp)))]
    namespace = {"math": math, "Tuple": tuple}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(source), "exec"), namespace)
    return namespace["smart_resize"]


# ---- hand-derived values -------------------------------------------------------------------------------------

def test_rounds_to_nearest_multiple_of_28():
    # 1080 / 28 = 38.57 -> 39 * 28 = 1092; 1920 / 28 = 68.57 -> 69 * 28 = 1932; 2.1 MP is inside the bounds.
    assert smart_resize(1080, 1920) == (1092, 1932)
    assert num_merged_tokens(1092, 1932) == 39 * 69


def test_ties_round_half_to_even_like_python_round():
    # 70 / 28 = 2.5 -> 2; 98 / 28 = 3.5 -> 4 (the reference uses Python's round()).
    assert smart_resize(70, 98) == (56, 112)


def test_too_small_scales_up_with_ceil():
    # 10x10 rounds to 28x28 = 784 px < 3136: beta = sqrt(3136 / 100) = 5.6, 10 * 5.6 = 56 -> ceil to 56.
    assert smart_resize(10, 10) == (56, 56)


def test_too_large_scales_down_with_floor():
    # 4000x3000 with max 256 tokens: beta = sqrt(12e6 / 200704) = 7.7322; 4000 / beta = 517.3 -> 18 * 28 = 504;
    # 3000 / beta = 388.0 -> 13 * 28 = 364.  504 * 364 / 784 = 234 tokens <= 256.
    assert smart_resize(4000, 3000, min_pixels=64 * TOK, max_pixels=256 * TOK) == (504, 364)


def test_aspect_ratio_limit_is_200():
    assert smart_resize(28, 5600) == (28, 5600)  # exactly 200:1 is allowed
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(100_000, 28)


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=0, width=10), "height"),
    (dict(height=10, width=-3), "width"),
    (dict(height=10.0, width=10), "height"),
    (dict(height=True, width=10), "height"),
    (dict(height=10, width=10, factor=0), "factor"),
    (dict(height=10, width=10, min_pixels=5000, max_pixels=4000), "min_pixels"),
    (dict(height=10, width=10, min_pixels=10, max_pixels=100), "max_pixels"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=f"smart_resize.*{match}"):
        smart_resize(**kwargs)


def test_num_merged_tokens_rejects_unaligned_size():
    with pytest.raises(ValueError, match="multiple"):
        num_merged_tokens(30, 56)


# ---- randomized properties and the reference ---------------------------------------------------------------

def rounded_area(h, w):
    """Area after step 2 of the rule (nearest multiples of 28): decides which branch smart_resize takes."""
    return max(28, round(h / 28) * 28) * max(28, round(w / 28) * 28)


def test_properties_random_sizes():
    rng = random.Random(1234)
    for _ in range(3000):
        h, w = rng.randint(1, 8000), rng.randint(1, 8000)
        if max(h, w) / min(h, w) > 50:
            continue
        lo, hi = rng.choice([4, 16, 64]) * TOK, rng.choice([64, 256, 1280, 20480]) * TOK
        if lo > hi:
            continue
        rh, rw = smart_resize(h, w, min_pixels=lo, max_pixels=hi)
        assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
        area = rounded_area(h, w)
        if lo <= area <= hi:  # in bounds after rounding: nothing else changes
            assert (rh, rw) == (max(28, round(h / 28) * 28), max(28, round(w / 28) * 28))
        elif area > hi:  # floor branch: never over max_pixels (it may end a little under min_pixels)
            assert rh * rw <= hi, (h, w, rh, rw)
        else:  # ceil branch: never under min_pixels (it may end a little over max_pixels, as the reference does)
            assert rh * rw >= lo, (h, w, rh, rw)
        # Aspect ratio kept up to one 28-pixel step on each side.
        assert abs(rh / rw - h / w) <= (h / w) * (28 / min(rh, rw) + 28 / max(rh, rw)) + 1e-9, (h, w, rh, rw)


def test_equals_keye_vl_utils_reference():
    ref = reference_smart_resize()
    rng = random.Random(99)
    cases = [(1, 1), (27, 28), (28, 28), (42, 70), (1080, 1920), (720, 1280), (272, 640), (144, 176), (28, 5600)]
    cases += [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(4000)]
    for h, w in cases:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in ((MIN_PIXELS, MAX_PIXELS), (64 * TOK, 256 * TOK), (48 * TOK, 768 * TOK), (4 * TOK, 1280 * TOK)):
            assert smart_resize(h, w, min_pixels=lo, max_pixels=hi) == ref(h, w, min_pixels=lo, max_pixels=hi), \
                (h, w, lo, hi)


# ---- video budget -----------------------------------------------------------------------------------------------

def test_budget_cap_hand_values():
    # 184,320 total, 64..256 per frame; the search returns the first T with n * T > total (or the bounds).
    assert max_tokens_per_frame(2) == 256
    assert max_tokens_per_frame(720) == 256      # 720 * 256 = 184,320 is not over the total
    assert max_tokens_per_frame(721) == 256      # 721 * 255 = 183,855 fits, so the first T over it is 256
    assert max_tokens_per_frame(1000) == 185     # 1000 * 184 = 184,000 fits, 1000 * 185 does not
    assert max_tokens_per_frame(2880) == 65      # 2880 * 64 = 184,320 fits exactly
    assert max_tokens_per_frame(5000) == 64      # already over at the minimum
    # Two videos split the budget: 92,160 each.
    assert max_tokens_per_frame(360, num_videos=2) == 256
    assert max_tokens_per_frame(500, num_videos=2) == 185   # 500 * 184 = 92,000 fits, 500 * 185 does not


def test_budget_total_and_per_frame_limits():
    rng = random.Random(7)
    checked = 0
    for _ in range(600):
        n = rng.randint(1, 3000)
        num_videos = rng.choice([1, 1, 2, 3])
        h, w = rng.randint(100, 2000), rng.randint(100, 2000)
        cap = max_tokens_per_frame(n, num_videos=num_videos)
        assert 64 <= cap <= 256
        if n * 256 * num_videos <= 184_320:
            assert cap == 256
        rh, rw = video_frame_size(n, h, w, num_videos=num_videos)
        per_frame = num_merged_tokens(rh, rw)
        if rounded_area(h, w) < 64 * TOK:
            continue  # ceil branch (tiny frames, scaled up to >= 64 tokens): may pass cap, as in the reference
        checked += 1
        assert per_frame <= cap, (n, h, w, per_frame, cap)
        # Within budget up to the reference's overshoot of at most one token per frame, whenever the frame count
        # allows it at all (the video reader samples at most total / 64 frames; more cannot fit at 64 each).
        if n * 64 * num_videos <= 184_320:
            assert n * per_frame * num_videos <= 184_320 + n * num_videos, (n, per_frame, num_videos)
    assert checked > 400


def test_video_frame_size_hand_value():
    # 2 frames of 1080x1920: cap 256. Rounded 1092x1932 is over 256 * 784 = 200,704 px, so
    # beta = sqrt(1080 * 1920 / 200704) = 3.2143; 1080 / beta = 336.0 -> 12 * 28 = 336;
    # 1920 / beta = 597.3 -> 21 * 28 = 588.
    assert video_frame_size(2, 1080, 1920) == (336, 588)
    assert num_merged_tokens(336, 588) == 12 * 21  # 252 <= 256


def test_budget_bad_arguments():
    with pytest.raises(ValueError, match="num_frames"):
        max_tokens_per_frame(0)
    with pytest.raises(ValueError, match="num_videos"):
        max_tokens_per_frame(3, num_videos=0)
    with pytest.raises(ValueError, match="min_tokens_per_frame"):
        VideoBudget(min_tokens_per_frame=300, max_tokens_per_frame=256)
    with pytest.raises(ValueError, match="total_tokens"):
        VideoBudget(total_tokens=0)


def test_resizing_an_already_resized_frame_keeps_its_size():
    """A video reader may decode straight to video_frame_size(); the processor then sizes the frames again and
    must get the same answer (so it does not resize twice). Holds whenever the first result is in bounds."""
    rng = random.Random(11)
    for _ in range(2000):
        n, h, w = rng.randint(1, 2880), rng.randint(50, 4000), rng.randint(50, 4000)
        if max(h, w) / min(h, w) > 20:
            continue
        rh, rw = video_frame_size(n, h, w)
        if 64 <= num_merged_tokens(rh, rw) <= max_tokens_per_frame(n):
            assert video_frame_size(n, rh, rw) == (rh, rw), (n, h, w, rh, rw)
        ih, iw = smart_resize(h, w)
        assert smart_resize(ih, iw) == (ih, iw)
