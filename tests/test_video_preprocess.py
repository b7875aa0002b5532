"""keye.video.preprocess: frames -> (patches, grid_thw, timestamps) as the model's vision input expects."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from keye.processor.budget import VideoBudget
from keye.processor.image import unpatchify
from keye.video.preprocess import frame_size, to_model_inputs


def independent_patches(frames, h, w):
    """Spec written out: the reference resizes the uint8 frames with torch's uint8 bilinear antialiased
    interpolate, then x/255, (x - 0.5)/0.5, 14x14 patches in raster order."""
    x = F.interpolate(frames.permute(0, 3, 1, 2).contiguous(), size=(h, w), mode="bilinear", antialias=True,
                      align_corners=False).double()
    x = (x / 255 - 0.5) / 0.5
    out = []
    for f in range(x.shape[0]):
        for r in range(h // 14):
            for c in range(w // 14):
                out.append(x[f, :, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14])
    return torch.stack(out)


def test_patches_grid_timestamps(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    frames = torch.randint(0, 256, (3, 90, 130, 3), dtype=torch.uint8, generator=g)
    out = to_model_inputs(frames, [0.0, 0.5, 1.0])
    h, w = frame_size(3, 90, 130)
    # 84x140 would be 15 tokens, under the 64-token floor: scaled up by sqrt(64*784 / (90*130)), ceil to 28s.
    assert (h, w) == (196, 280)
    assert out.patches.shape == (3 * (h // 14) * (w // 14), 3, 14, 14) and out.patches.dtype == torch.float32
    assert out.grid_thw.tolist() == [[1, h // 14, w // 14]] * 3 and out.grid_thw.dtype == torch.long
    assert out.timestamps.dtype == torch.float32 and out.timestamps.tolist() == [0.0, 0.5, 1.0]
    ref = independent_patches(frames, h, w)
    diff = (out.patches.double() - ref).abs() * 255 / 2  # in uint8 levels
    assert diff.max() <= 2.0 + 1e-4 and diff.mean() < 0.05  # the processor emulates uint8 resampling in float
    assert out.num_tokens == 3 * (h // 28) * (w // 28)
    assert out.patches.flatten(1).shape[1] == 588  # rows of 3*14*14 if a caller wants them flat
    back = unpatchify(out.patches, (3, h // 14, w // 14))
    assert back.shape == (3, 3, h, w) and torch.equal(back[2, :, :14, :14], out.patches[2 * (h // 14) * (w // 14)])


def test_budget_720p_long_video():
    # 1192 frames (10 min at 2 fps) of 720p: cap = floor(184320 / 1192) + 1 = 155 tokens per frame.
    h, w = frame_size(1192, 720, 1280)
    assert h % 28 == 0 and w % 28 == 0
    tokens = (h // 28) * (w // 28)
    assert 64 <= tokens <= 155
    assert 1192 * tokens <= 184_320 + 1192
    # 20 frames: the 256-token cap.
    h, w = frame_size(20, 720, 1280)
    assert (h // 28) * (w // 28) <= 256 and (h, w) == (336, 588)
    h2, w2 = frame_size(20, 720, 1280, VideoBudget(total_tokens=20 * 100))
    assert (h2 // 28) * (w2 // 28) <= 101


def test_size_override_and_validation():
    frames = torch.zeros(2, 56, 56, 3, dtype=torch.uint8)
    out = to_model_inputs(frames, np.array([0.0, 1.0]), size=(28, 56))
    assert out.grid_thw.tolist() == [[1, 2, 4]] * 2
    assert torch.allclose(out.patches, torch.full_like(out.patches, -1.0))  # black -> -1
    with pytest.raises(ValueError, match="multiples of 28"):
        to_model_inputs(frames, [0.0, 1.0], size=(30, 56))
    with pytest.raises(ValueError, match="one timestamp per frame"):
        to_model_inputs(frames, [0.0])
    with pytest.raises(ValueError, match="uint8"):
        to_model_inputs(frames.float(), [0.0, 1.0])
    with pytest.raises(ValueError, match="uint8"):
        to_model_inputs(np.zeros((2, 56, 56, 3), np.uint8), [0.0, 1.0])


def test_adaptive_budget_steps():
    from keye.video.preprocess import adaptive_budget

    assert adaptive_budget(60.0).total_tokens == int(184_320 * 0.09)
    assert adaptive_budget(259.0).total_tokens == int(184_320 * 0.09)
    assert adaptive_budget(259.5).total_tokens == int(184_320 * 0.18)
    assert adaptive_budget(600.0).total_tokens == int(184_320 * 0.36)
    assert adaptive_budget(2000.0).total_tokens == int(184_320 * 0.7)
    assert adaptive_budget(7200.0).total_tokens == 184_320
    assert adaptive_budget(600.0, VideoBudget(total_tokens=1000)).total_tokens == 360
    with pytest.raises(ValueError, match="duration_s"):
        adaptive_budget(float("nan"))
