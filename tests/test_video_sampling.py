"""keye.video.sampling against its specification, on hand-made indexes (no files)."""

from fractions import Fraction

import numpy as np
import pytest

from keye.video.index import VideoIndex
from keye.video.sampling import num_frames_for, sample_at_times, sample_by_fps, sample_frames


def make_index(pts, tb=Fraction(1, 1000), last=None, keys=None):
    pts = np.asarray(pts, dtype=np.int64)
    keyframe = np.zeros(len(pts), bool)
    keyframe[0] = True
    if keys is not None:
        keyframe[keys] = True
    last = float(np.median(np.diff(pts))) * float(tb) if last is None else last
    return VideoIndex(source="mem", codec="h264", width=64, height=48, time_base=tb, pts=pts, keyframe=keyframe,
                      last_duration=last, file_size=1)


def cfr_index(n, fps):
    return make_index(np.arange(n), tb=Fraction(1, fps), last=1 / fps)


def reference_keye2(total, fps_video, fps=2.0, min_frames=2, max_frames=2880):
    """sglang keye_adaptive_video as documented (docs/keye-vl-2.md §3.3): index linspace, rounded."""
    duration = total / fps_video
    n = min(max(int(duration * fps), min_frames), min(max_frames, total))
    idx = np.round(np.linspace(0, total - 1, n)).astype(np.int64)
    return idx, idx / fps_video


@pytest.mark.parametrize("trial", range(40))
def test_cfr_matches_reference(trial):
    rng = np.random.default_rng(trial)
    total = int(rng.integers(1, 20000))
    fps_video = float(rng.choice([10, 23.976, 24, 25, 29.97, 30, 60]))
    fps = float(rng.choice([0.5, 1, 2, 4]))
    idx = make_index(np.round(np.arange(total) * 1e6 / fps_video).astype(np.int64), tb=Fraction(1, 1_000_000),
                     last=1 / fps_video)
    want, want_ts = reference_keye2(total, fps_video, fps)
    got = sample_by_fps(idx, fps)
    # Exact ties (a target exactly between two frames) may round either way under the microsecond PTS grid.
    pos = np.linspace(0, total - 1, len(want))
    tie = np.abs(pos - np.floor(pos) - 0.5) < 1e-6
    assert len(got) == len(want)
    assert (got.frames[~tie] == want[~tie]).all()
    assert np.allclose(np.abs(got.frames[tie] - pos[tie]), 0.5, atol=1e-6)
    np.testing.assert_allclose(got.timestamps, got.frames / fps_video, atol=1e-6)


def test_frame_count_rule():
    # duration * fps, at least 2, at most 2880 and at most the frames there are.
    assert num_frames_for(10.0, 2.0, 250) == 20
    assert num_frames_for(0.3, 2.0, 8) == 2
    assert num_frames_for(0.3, 2.0, 1) == 1
    assert num_frames_for(3600.0, 2.0, 90000) == 2880
    assert num_frames_for(3600.0, 2.0, 90000, max_frames=100) == 100
    assert num_frames_for(3600.0, 2.0, 90000, max_frames=5000) == 2880
    assert num_frames_for(10.0, 2.0, 15) == 15
    # Keye-VL-1.5: fps capped by the video's, no minimum, at most 1365.
    assert num_frames_for(10.0, 2.0, 250, rule="keye1.5", video_fps=1.0) == 10
    assert num_frames_for(0.3, 2.0, 8, rule="keye1.5", video_fps=25.0) == 1
    assert num_frames_for(3600.0, 2.0, 90000, rule="keye1.5", video_fps=25.0) == 1365


def test_vfr_spreads_in_time_not_index():
    # 1 s at 100 fps followed by 9 s at 1 fps: 10 s, 109 frames.
    pts = np.r_[np.arange(100) * 10, 1000 + np.arange(9) * 1000]
    idx = make_index(pts, last=1.0)
    sel = sample_by_fps(idx, fps=1.0)
    assert len(sel) == 10
    # Instants 0, 0.888.., 1.77.., ..., 9: nearest frames in time; index-linspace would put 8 of 10 in the first second.
    targets = np.linspace(0, 9.0, 10)
    ts = idx.timestamps
    nearest = np.array([np.argmin(np.abs(ts - t)) for t in targets])
    assert (sel.frames == nearest).all()
    assert (sel.timestamps == ts[nearest]).all()
    assert (sel.timestamps[1:] >= 0.8).all()


def test_explicit_times_pick_frame_shown():
    idx = make_index([0, 40, 60, 120, 200], last=0.05)  # ms; ends at 0.25 s
    sel = sample_at_times(idx, [0.0, 0.039, 0.04, 0.0599, 0.1, 0.2499, 0.0])
    assert sel.frames.tolist() == [0, 0, 1, 1, 2, 4, 0]
    np.testing.assert_allclose(sel.timestamps, [0, 0, 0.04, 0.04, 0.06, 0.2, 0])
    for bad in ([0.25], [-0.01], [float("nan")], [], [[0.1]]):
        with pytest.raises(ValueError, match="sample_at_times"):
            sample_at_times(idx, bad)


def test_time_range():
    idx = cfr_index(250, 25)  # 10 s
    sel = sample_by_fps(idx, 2.0, start=2.0, end=4.0)
    assert len(sel) == 4
    assert sel.timestamps.min() >= 2.0 and sel.timestamps.max() <= 4.0
    assert sel.frames.tolist() == [50, 67, 83, 100]
    sel = sample_frames(idx, start=9.0)  # to the end
    assert sel.timestamps[-1] == pytest.approx(9.96) and len(sel) == 2
    with pytest.raises(ValueError, match="start"):
        sample_by_fps(idx, 2.0, start=4.0, end=3.0)
    with pytest.raises(ValueError, match="past the end"):
        sample_by_fps(idx, 2.0, start=10.0)
    with pytest.raises(ValueError, match="cannot be combined"):
        sample_frames(idx, times=[1.0], fps=2)


def test_bad_arguments_are_named():
    idx = cfr_index(100, 25)
    for kwargs in ({"fps": 0}, {"fps": -1.0}, {"fps": float("inf")}, {"fps": True}):
        with pytest.raises(ValueError, match="fps"):
            sample_by_fps(idx, **kwargs)
    with pytest.raises(ValueError, match="min_frames"):
        sample_by_fps(idx, 2.0, min_frames=0)
    with pytest.raises(ValueError, match="rule"):
        sample_by_fps(idx, 2.0, rule="qwen")
    with pytest.raises(ValueError, match="min_frames"):
        sample_by_fps(idx, 2.0, min_frames=10, max_frames=5)


def test_single_frame_video():
    idx = make_index([0], last=0.04)
    assert sample_frames(idx).frames.tolist() == [0]
    assert sample_at_times(idx, [0.02]).frames.tolist() == [0]


@pytest.mark.parametrize("trial", range(20))
def test_vfr_random_nearest_in_time(trial):
    rng = np.random.default_rng(1000 + trial)
    steps = rng.choice([10, 17, 33, 40, 67, 100, 250], size=int(rng.integers(2, 3000)))
    pts = np.concatenate([[0], np.cumsum(steps)[:-1]])
    idx = make_index(pts, last=float(steps[-1]) / 1000)
    sel = sample_by_fps(idx, float(rng.choice([0.5, 1, 2, 4])))
    ts = idx.timestamps
    targets = np.linspace(ts[0], ts[-1], len(sel))
    err = np.abs(ts[sel.frames] - targets)
    best = np.abs(ts[None, :] - targets[:, None]).min(axis=1)
    assert np.allclose(err, best, atol=1e-9)  # every pick is a nearest frame to its instant
    assert (np.diff(sel.frames) >= 0).all() and sel.frames[0] == 0 and sel.frames[-1] == len(ts) - 1
    assert np.array_equal(sel.timestamps, ts[sel.frames])


def test_keyframe_lookup():
    idx = make_index(np.arange(10) * 40, keys=[4, 8])
    assert idx.keyframe_at_or_before(np.array([0, 3, 4, 7, 8, 9])).tolist() == [0, 0, 4, 4, 8, 8]
    late = VideoIndex(source="mem", codec="h264", width=8, height=8, time_base=Fraction(1, 1000),
                      pts=np.arange(5) * 40, keyframe=np.array([False, False, True, False, False]),
                      last_duration=0.04, file_size=1)
    from keye.video.errors import CorruptVideoError

    with pytest.raises(CorruptVideoError, match="before the first key frame"):
        late.keyframe_at_or_before(np.array([1]))
    assert idx.duration == pytest.approx(0.4) and idx.average_fps == pytest.approx(25.0)
