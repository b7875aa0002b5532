"""Real long videos from the moviepy 2.2.1 sdist (fetched from PyPI at test time and cached; skipped when that is
impossible): the 55 s 720p trailer by default, the 10-minute Big Buck Bunny film only with KEYE_VIDEO_LONG=1."""

import os

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV (pip install av) is needed for keye.video's CPU path")

from keye.video import build_index, decode_frames_cpu, sample_at_times, sample_frames  # noqa: E402
from keye.video.assets import AssetUnavailable, moviepy_files  # noqa: E402

LONG = os.environ.get("KEYE_VIDEO_LONG") == "1"
long_test = pytest.mark.skipif(not LONG, reason="long test (decodes a 10-minute film); set KEYE_VIDEO_LONG=1")


def assets(include_film):
    try:
        return moviepy_files(include_film=include_film)
    except AssetUnavailable as e:
        pytest.skip(f"moviepy 2.2.1 sdist unavailable: {e}")


def sequential_upto(path, last):
    frames = []
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            frames.append(f.to_ndarray(format="rgb24"))
            if i == last:
                break
    return frames


def test_trailer_index_sampling_and_exact_frames():
    path = assets(include_film=False)["trailer_bbb.mp4"]
    index = build_index(path)
    assert (index.num_frames, index.width, index.height, index.codec) == (1323, 1280, 720, "h264")
    assert 10 <= index.keyframe.sum() <= 12  # ffprobe counts 12 key frames, PyAV flags 11 packets
    assert index.duration == pytest.approx(55.125, abs=0.01)
    sel = sample_frames(index, fps=2)
    assert len(sel) == 110
    assert sel.frames.tolist() == np.round(np.linspace(0, 1322, 110)).astype(int).tolist()
    np.testing.assert_allclose(sel.timestamps, sel.frames / 24.0)
    # Exact frames within the first 12 s, against a plain sequential decode.
    times = [0.0, 1.0, 3.3, 7.49, 11.99]
    at = sample_at_times(index, times)
    assert at.frames.tolist() == [0, 24, 79, 179, 287]
    got = decode_frames_cpu(path, at.frames, index).numpy()
    ref = sequential_upto(path, 287)
    for j, i in enumerate(at.frames):
        assert np.array_equal(got[j], ref[i])


@long_test
def test_film_10_minutes_at_2fps():
    path = assets(include_film=True)["bbb.mp4"]
    index = build_index(path)
    assert index.num_frames == 14315 and index.keyframe.sum() >= 150  # PyAV flags 190 (ffprobe: 304 I-frames)
    sel = sample_frames(index, fps=2)
    assert len(sel) == int(index.duration * 2) == 1192
    np.testing.assert_allclose(sel.timestamps, sel.frames / 24.0)
    frames = decode_frames_cpu(path, sel.frames, index)
    assert tuple(frames.shape) == (1192, 720, 1280, 3)
    ref = sequential_upto(path, int(sel.frames[3]))
    for j in range(4):
        assert np.array_equal(frames[j].numpy(), ref[int(sel.frames[j])])


@long_test
def test_film_pieces_for_gpu_split_are_exact():
    """The 12 pieces DaliDecoder.decode_split would hand to 12 NVDEC streams: each starts at an IDR picture and,
    decoded on its own (PyAV here), gives exactly the film's frames of its run."""
    import time

    from keye.video.dali import check_nvdec_start, cut_piece, split_at_random_access

    path = assets(include_film=True)["bbb.mp4"]
    index = build_index(path)
    want = np.unique(sample_frames(index, fps=2).frames)
    runs = split_at_random_access(index, want, 12)
    assert len(runs) == 12 and np.array_equal(np.concatenate(runs), want)
    t0 = time.perf_counter()
    pieces = [cut_piece(path, index, run) for run in runs]
    print(f"cutting 12 pieces: {time.perf_counter() - t0:.2f} s, "
          f"{sum(len(p) for p, _ in pieces) / 1e6:.1f} MB of {index.file_size / 1e6:.1f} MB")
    for run, (piece, local) in zip(runs, pieces):
        check_nvdec_start(build_index(piece))  # each starts at an IDR: 73 of the film's 190 key frames are not
        probe = np.r_[0, len(run) // 2, len(run) - 1]
        got = decode_frames_cpu(piece, local[probe]).numpy()
        ref = decode_frames_cpu(path, run[probe], index).numpy()
        assert np.array_equal(got, ref)
