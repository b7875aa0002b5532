"""Which frames to take from a video: by fps, at explicit times, or inside a time range.

All three work on a `VideoIndex` (real per-frame timestamps), so they are right for variable frame rate too.
Results are `FrameSelection`s: frame indices in presentation order plus each frame's own timestamp (seconds from
the first frame), which is what the prompt shows (`<|frame|>12.5`).

By fps (Keye-VL-2.0, sglang `keye_adaptive_video`; docs/keye-vl-2.md §3.3):
    n = min(max(int(duration * fps), min_frames), max_frames, frames available)   defaults fps 2, 2..2880
    the n frames nearest in time to n instants spread evenly from the first to the last frame.
For constant frame rate this is exactly the reference's `linspace(0, N - 1, n).round()` (ties to even), and its
timestamps index / fps; for variable frame rate the instants are spread evenly in *time*, not in index.
Keye-VL-1.5 (`rule="keye1.5"`, keye-vl-utils 1.5.2 §3.2): fps' = min(fps, average fps), no minimum, at most
1365 frames, same placement.

At explicit times: the frame *shown* at each time t (the last frame whose timestamp is <= t), as a player
would display it. t must lie inside [0, duration): asking past the end is an error, never a padded frame.

Time range [start, end] (seconds): the fps rule applied to the frames whose timestamps lie in the range, with
the range's length as the duration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keye.video.index import VideoIndex

KEYE2_MAX_FRAMES = 2880  # floor(184,320 tokens / 64 tokens per frame)
KEYE15_MAX_FRAMES = 1365  # floor(65,536 / 48)
RULES = ("keye2", "keye1.5")


@dataclass(frozen=True, eq=False)
class FrameSelection:
    frames: np.ndarray      # int64 [n] frame indices, non-decreasing
    timestamps: np.ndarray  # float64 [n] seconds of those frames

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def _positive_number(name: str, value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _count(name: str, value, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def num_frames_for(duration: float, fps: float, available: int, rule: str = "keye2", min_frames: int = 2,
                   max_frames: int | None = None, video_fps: float | None = None) -> int:
    """How many frames the fps rule takes from `available` frames spanning `duration` seconds."""
    where = "num_frames_for"
    if rule not in RULES:
        raise ValueError(f"{where}: rule must be one of {RULES}, got {rule!r}")
    fps = _positive_number("fps", fps, where)
    if rule == "keye1.5":
        if video_fps is not None:
            fps = min(fps, _positive_number("video_fps", video_fps, where))
        cap = KEYE15_MAX_FRAMES if max_frames is None else min(_count("max_frames", max_frames, where, 1),
                                                               KEYE15_MAX_FRAMES)
        return max(1, min(int(duration * fps), cap, available))  # 1.5 has no minimum; one frame at the least
    min_frames = _count("min_frames", min_frames, where, 1)
    cap = KEYE2_MAX_FRAMES if max_frames is None else min(_count("max_frames", max_frames, where, 1),
                                                          KEYE2_MAX_FRAMES)
    if min_frames > cap:
        raise ValueError(f"{where}: min_frames ({min_frames}) > max_frames ({cap})")
    return min(max(int(duration * fps), min_frames), cap, available)


def _nearest_evenly_spaced(ts: np.ndarray, n: int) -> np.ndarray:
    """Indices into ts (sorted) of the frames nearest to n instants spaced evenly over [ts[0], ts[-1]].
    The position is interpolated between neighbouring frames and rounded half-to-even, so for evenly spaced ts
    it reproduces np.round(np.linspace(0, len(ts) - 1, n)) (the reference) exactly, ties included."""
    if n == 1 or len(ts) == 1:  # the reference's linspace(0, N - 1, 1) is [0]
        return np.zeros(min(n, len(ts)), dtype=np.int64)
    targets = np.linspace(ts[0], ts[-1], n)
    lo = np.clip(np.searchsorted(ts, targets, side="right") - 1, 0, len(ts) - 2)
    frac = (targets - ts[lo]) / (ts[lo + 1] - ts[lo])
    # Snap float noise so exact midpoints stay exact (1e-9 of a frame interval is far below any real spacing).
    frac = np.where(np.abs(frac - 0.5) < 1e-9, 0.5, frac)
    frac = np.where(np.abs(frac - 1.0) < 1e-9, 1.0, frac)
    frac = np.where(np.abs(frac) < 1e-9, 0.0, frac)
    pos = np.rint(lo + frac).astype(np.int64)
    return np.clip(pos, 0, len(ts) - 1)


def sample_by_fps(index: VideoIndex, fps: float = 2.0, *, rule: str = "keye2", min_frames: int = 2,
                  max_frames: int | None = None, start: float | None = None,
                  end: float | None = None) -> FrameSelection:
    """Frames by the fps rule (module doc), optionally inside the time range [start, end] seconds."""
    where = "sample_by_fps"
    ts = index.timestamps
    lo_t = 0.0 if start is None else float(start)
    hi_t = index.duration if end is None else float(end)
    if np.isfinite(lo_t) and lo_t >= index.duration:
        raise ValueError(f"{where}: start={lo_t} s is at or past the end of {index.source} "
                         f"({index.duration:.3f} s)")
    if not (np.isfinite(lo_t) and np.isfinite(hi_t)) or lo_t < 0 or hi_t <= lo_t:
        raise ValueError(f"{where}: need 0 <= start < end, got start={start!r} end={end!r}")
    inside = np.flatnonzero((ts >= lo_t) & (ts <= hi_t))
    if inside.size == 0:
        raise ValueError(f"{where}: no frame of {index.source} has a timestamp in [{lo_t}, {hi_t}] s")
    duration = min(hi_t, index.duration) - lo_t
    n = num_frames_for(duration, fps, int(inside.size), rule, min_frames, max_frames, index.average_fps)
    picked = inside[_nearest_evenly_spaced(ts[inside], n)]
    return FrameSelection(frames=picked.astype(np.int64), timestamps=ts[picked])


def sample_at_times(index: VideoIndex, times) -> FrameSelection:
    """The frame shown at each of `times` (seconds, any order, repeats allowed; see module doc)."""
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"sample_at_times: times must be a non-empty 1-D list of seconds, got shape {list(t.shape)}")
    if not np.isfinite(t).all():
        raise ValueError("sample_at_times: times must be finite")
    bad = t[(t < 0) | (t >= index.duration)]
    if bad.size:
        raise ValueError(f"sample_at_times: times {bad[:4].tolist()} lie outside [0, {index.duration:.6f}) s, the "
                         f"span of {index.source}")
    ts = index.timestamps
    frames = np.searchsorted(ts, t, side="right") - 1
    return FrameSelection(frames=frames.astype(np.int64), timestamps=ts[frames])


def sample_frames(index: VideoIndex, *, fps: float | None = None, times=None, start: float | None = None,
                  end: float | None = None, **fps_options) -> FrameSelection:
    """One entry point: `times=[...]` for explicit times, else the fps rule (fps default 2) over the whole video
    or [start, end]."""
    if times is not None:
        if fps is not None or start is not None or end is not None or fps_options:
            raise ValueError("sample_frames: times=... cannot be combined with fps, start, end or fps options")
        return sample_at_times(index, times)
    return sample_by_fps(index, 2.0 if fps is None else fps, start=start, end=end, **fps_options)
