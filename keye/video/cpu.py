"""CPU decoding with PyAV: exactly the requested frames, as uint8 RGB.

Frame i is the i-th frame of the VideoIndex (presentation order). For each requested frame the decoder starts at
the last key frame at or before it and decodes forward; frames are identified by their PTS, never by counting, so
a seek that lands early is harmless and one that lands late is detected. Consecutive requests in the same or the
next group of pictures continue decoding instead of seeking again.

Anything the decoder cannot deliver raises (keye.video.errors): data FFmpeg rejects or flags as corrupt, and
requested frames the file never produces (truncation) — no black or repeated frames stand in for them.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from keye.video.errors import CorruptVideoError, TruncatedVideoError, UnsupportedCodecError, VideoTimeoutError
from keye.video.index import VideoIndex, build_index, open_container


def check_frame_indices(index: VideoIndex, frames, where: str) -> np.ndarray:
    f = np.asarray(frames)
    if f.ndim != 1 or f.size == 0 or not (np.issubdtype(f.dtype, np.integer)):
        raise ValueError(f"{where}: frames must be a non-empty 1-D list of ints, got {f.dtype} shape {list(f.shape)}")
    if f.min() < 0 or f.max() >= index.num_frames:
        raise ValueError(f"{where}: frame indices must be in [0, {index.num_frames}) for {index.source}, got "
                         f"min {int(f.min())} max {int(f.max())}")
    return f.astype(np.int64)


def decode_frames_cpu(source, frames, index: VideoIndex | None = None, threads: int = 0,
                      deadline: float | None = None) -> torch.Tensor:
    """uint8 [len(frames), H, W, 3] RGB, in the order of `frames` (repeats allowed). `threads`: FFmpeg decoder
    threads (0 = FFmpeg's choice; use 1 when many files are decoded in parallel). `deadline`: a time.monotonic()
    value after which decoding stops with VideoTimeoutError (checked between frames)."""
    import av
    from av.video.reformatter import VideoReformatter

    index = build_index(source) if index is None else index
    frames = check_frame_indices(index, frames, "decode_frames_cpu")
    wanted = np.unique(frames)
    keys = index.keyframe_at_or_before(wanted)
    frame_of_pts = {int(p): i for i, p in enumerate(index.pts)}
    got: dict[int, np.ndarray] = {}
    name = index.source
    to_rgb = VideoReformatter()  # reused: building a colour converter per frame costs more than decoding it

    container, _ = open_container(source)
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if threads != 1 else "SLICE"
        stream.thread_count = threads
        decoded = None  # frame generator of the current run
        last = -1  # index of the last frame decoded in this run
        seek_floor = 0
        i = 0
        try:
            while i < len(wanted):
                target = int(wanted[i])
                # Seek only when the target's key frame lies beyond everything this run has reached: after a seek,
                # pictures shown before the key frame (open GOP leading pictures) arrive first and must not
                # trigger another seek.
                if decoded is None or keys[i] > max(last, seek_floor):
                    container.seek(int(index.pts[keys[i]]), stream=stream, backward=True, any_frame=False)
                    decoded, last, seek_floor = container.decode(stream), -1, int(keys[i])
                if deadline is not None and time.monotonic() > deadline:
                    raise VideoTimeoutError(name, f"decoding passed its time limit after {len(got)} of "
                                                  f"{len(wanted)} frames")
                frame = next(decoded, None)
                if frame is None:
                    raise TruncatedVideoError(name, f"the decoder stopped before frame {target} (of "
                                                    f"{index.num_frames} indexed); the data ends early")
                fi = frame_of_pts.get(frame.pts if frame.pts is not None else -1 << 62)
                if fi is None or fi < seek_floor:
                    continue  # not a frame of the index (dropped), or a leading picture decoded without its refs
                if frame.is_corrupt:
                    raise CorruptVideoError(name, f"the decoder flagged frame {fi} as corrupt")
                if last < 0 and fi > target:
                    raise CorruptVideoError(name, f"seeking to frame {seek_floor} landed at frame {fi}, past the "
                                                  f"requested frame {target}; the container's seek index is wrong")
                last = fi
                if fi == target:
                    got[fi] = to_rgb.reformat(frame, format="rgb24").to_ndarray()
                    i += 1
                elif fi > target:
                    raise CorruptVideoError(name, f"frame {target} was never output (the decoder went from before "
                                                  f"it to frame {fi})")
        except av.error.FFmpegError as e:
            if isinstance(e, (av.error.DecoderNotFoundError, av.error.PatchWelcomeError)):
                raise UnsupportedCodecError(name, f"FFmpeg cannot decode {index.codec}: {e.strerror or e}") from e
            raise CorruptVideoError(name, f"decoding failed near frame {int(wanted[min(i, len(wanted) - 1)])}: "
                                          f"{e.strerror or e}") from e
    shapes = {a.shape for a in got.values()}
    if len(shapes) != 1:
        raise CorruptVideoError(name, f"frames changed size mid-stream ({sorted(shapes)}); not supported")
    out = np.stack([got[int(f)] for f in frames])
    return torch.from_numpy(out)
