"""keye.video: from video files to ViT-ready tensors (sampling, CPU/GPU decoding, preprocessing, loading).

    index = build_index("film.mp4")                       # per-frame timestamps (VFR-correct), key frames
    sel = sample_frames(index, fps=2)                     # or times=[...], or start=/end=
    frames = decode_frames_cpu("film.mp4", sel.frames, index)   # or keye.video.dali.DaliDecoder on the GPU
    inputs = to_model_inputs(frames.cuda(), sel.timestamps)      # patches, grid_thw, timestamps (torch)
    for sample in VideoLoader(paths, fps=2, device="cuda"): ...   # many files: prefetch, bad files skipped

GPU decoding (keye.video.dali) is imported on demand: it needs nvidia-dali-cuda130.
"""

from keye.video.cpu import decode_frames_cpu
from keye.video.errors import (CorruptVideoError, EmptyVideoError, NoVideoStreamError, TruncatedVideoError,
                               UnsupportedCodecError, VideoError, VideoNotFoundError, VideoTimeoutError)
from keye.video.index import VideoIndex, build_index
from keye.video.loader import VideoLoader, VideoSample
from keye.video.preprocess import VideoInputs, to_model_inputs
from keye.video.sampling import FrameSelection, sample_at_times, sample_by_fps, sample_frames
from keye.video.slowfast import SlowFastBudget, to_model_inputs_slowfast

__all__ = [
    "CorruptVideoError", "EmptyVideoError", "FrameSelection", "NoVideoStreamError", "TruncatedVideoError",
    "SlowFastBudget", "UnsupportedCodecError", "VideoError", "VideoIndex", "VideoInputs", "VideoLoader",
    "VideoNotFoundError", "VideoSample", "VideoTimeoutError", "build_index", "decode_frames_cpu", "sample_at_times",
    "sample_by_fps", "sample_frames", "to_model_inputs", "to_model_inputs_slowfast",
]
