"""Build .video_carry/r3 for bench/video_carry/nonidr_probe.py: one device call (DALI only, no PyAV there) that
checks what NVDEC through DALI does with a film piece starting at a non-IDR key frame, against the same run cut
at the IDR before it (keye.video.dali.cut_piece now), and times 12 concurrent streams on such pieces. (The
carry holds 64 MiB with the tree: DALI takes 56 MB of it, so two pieces of ~3 MB.)

    KEYE_VIDEO_CACHE=/work/cache python bench/video_carry/prepare_probe.py

Writes the pieces (Matroska, packets copied), the requested frame numbers inside each piece and a reference
thumbnail (18x32 RGB, 40x40-pixel means, from PyAV) of every requested frame, and copies the slim DALI + its
pure-Python deps from the cache (see build_cache.sh)."""

import dataclasses
import glob
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from keye.video import build_index, decode_frames_cpu, sample_frames  # noqa: E402
from keye.video.dali import cut_piece, split_at_random_access  # noqa: E402


def thumbs(frames: torch.Tensor) -> np.ndarray:
    x = frames.permute(0, 3, 1, 2).float()
    return torch.nn.functional.avg_pool2d(x, 40).permute(0, 2, 3, 1).numpy().astype(np.float32)


def main():
    cache = os.environ.get("KEYE_VIDEO_CACHE", os.path.expanduser("~/.cache/keye/video-carry"))
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    out = os.path.join(root, ".video_carry", "r3")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    film = os.path.join(cache, "bbb_video.mp4")
    index = build_index(film)
    want = np.unique(sample_frames(index, fps=2).frames)
    # the split the device ran before (balanced over every frame: pieces then held them all)
    by_key = split_at_random_access(index, want, 12, starts="keyframe", drop_disposable=False)
    keys_only = dataclasses.replace(index, random_access=index.keyframe)  # cut_piece as it was: any key frame
    firsts = index.keyframe_at_or_before(np.array([r[0] for r in by_key]))
    a = int(np.flatnonzero(~index.random_access[firsts])[0])  # first run that started at a non-IDR key frame
    pieces = {"A_nonidr_start": (keys_only, by_key[a]), "A_idr_start": (index, by_key[a])}
    meta = {}
    for name, (ix, run) in pieces.items():
        data, local = cut_piece(film, ix, run, drop_disposable=False)  # as then: every frame in the piece
        open(os.path.join(out, f"{name}.mkv"), "wb").write(data)
        meta[f"{name}_frames"] = local
        meta[f"{name}_global"] = run
        meta[f"{name}_thumbs"] = thumbs(decode_frames_cpu(film, run, index)).round().astype(np.uint8)
        print(name, f"run {run[0]}..{run[-1]}", f"piece starts at frame {run[0] - local[0]}", len(data), "bytes")
    np.savez_compressed(os.path.join(out, "probe.npz"), **meta)
    shutil.copy(os.path.join(cache, "dali_slim9.tar.xz"), os.path.join(out, "dali.tar.xz"))
    for whl in glob.glob(os.path.join(cache, "deps312", "*.whl")):
        shutil.copy(whl, out)
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "*")))
    print(f"r3: {total} bytes (+ the tree; limit {64 << 20})")


if __name__ == "__main__":
    main()
