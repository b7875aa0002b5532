"""Bad inputs: each gives a VideoError naming the file and the cause, never frames; the loader skips and goes on."""

import os
import time

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV (pip install av) is needed for keye.video's CPU path")

import keye.video.loader as loader_module  # noqa: E402
from keye.video import (CorruptVideoError, EmptyVideoError, NoVideoStreamError, TruncatedVideoError,  # noqa: E402
                        UnsupportedCodecError, VideoError, VideoNotFoundError, VideoTimeoutError, build_index,
                        decode_frames_cpu)
from keye.video.loader import VideoLoader  # noqa: E402
from keye.video.synthetic import read_barcode, write_barcode_video  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    f = {}
    f["good_mp4"] = str(root / "good.mp4")
    write_barcode_video(f["good_mp4"], 60, codec="h264")
    f["good_mkv"] = str(root / "good.mkv")
    write_barcode_video(f["good_mkv"], 60, codec="h264")
    f["good_webm"] = str(root / "good.webm")
    write_barcode_video(f["good_webm"], 60, codec="vp9", durations_ms=[40, 20])
    data = open(f["good_mp4"], "rb").read()
    assert data.find(b"moov") > data.find(b"mdat")  # PyAV writes the index at the end
    f["cut_mp4"] = str(root / "cut.mp4")
    open(f["cut_mp4"], "wb").write(data[: len(data) * 6 // 10])
    # A "fast start" MP4 (index first) cut in half: the index announces frames the file no longer holds.
    f["faststart"] = str(root / "faststart.mp4")
    with av.open(f["good_mkv"]) as src, av.open(f["faststart"], "w", options={"movflags": "faststart"}) as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    data = open(f["faststart"], "rb").read()
    assert data.find(b"moov") < data.find(b"mdat")
    f["cut_faststart"] = str(root / "cut_faststart.mp4")
    open(f["cut_faststart"], "wb").write(data[: len(data) // 2])
    data = open(f["good_mkv"], "rb").read()
    f["cut_mkv"] = str(root / "cut.mkv")
    open(f["cut_mkv"], "wb").write(data[: len(data) * 6 // 10])
    f["empty"] = str(root / "empty.mp4")
    open(f["empty"], "wb").close()
    f["garbage"] = str(root / "garbage.mp4")
    open(f["garbage"], "wb").write(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    # Video data overwritten in the middle (container intact): FFmpeg must refuse a packet.
    data = bytearray(open(f["good_mp4"], "rb").read())
    mdat = data.find(b"mdat")
    payload = int.from_bytes(data[mdat - 4:mdat], "big") - 8
    start, n = mdat + 4 + payload // 3, payload // 3
    data[start:start + n] = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes()
    f["corrupt_mid"] = str(root / "corrupt_mid.mp4")
    open(f["corrupt_mid"], "wb").write(bytes(data))
    f["audio"] = str(root / "audio.m4a")
    with av.open(f["audio"], "w") as out:
        stream = out.add_stream("aac", rate=44100)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    mjpeg = str(root / "mjpeg.avi")
    write_barcode_video(mjpeg, 10, codec="mjpeg")
    f["unknown_codec"] = str(root / "unknown_codec.avi")  # same AVI with a FourCC no decoder knows
    open(f["unknown_codec"], "wb").write(open(mjpeg, "rb").read().replace(b"MJPG", b"ZZ9Z"))
    f["missing"] = str(root / "does_not_exist.mp4")
    f["folder"] = str(root)
    return f


CASES = [
    ("missing", VideoNotFoundError, "no such file"),
    ("folder", VideoNotFoundError, "not a regular file"),
    ("empty", EmptyVideoError, "zero-length"),
    ("cut_mp4", TruncatedVideoError, "moov"),
    ("cut_faststart", TruncatedVideoError, "announces"),
    ("cut_mkv", TruncatedVideoError, "announces"),
    ("garbage", CorruptVideoError, "not a readable media container"),
    ("corrupt_mid", CorruptVideoError, "decod"),
    ("audio", NoVideoStreamError, "audio"),
    ("unknown_codec", UnsupportedCodecError, "no decoder"),
]


@pytest.mark.parametrize("name,error,cause", CASES, ids=[c[0] for c in CASES])
def test_bad_file_names_file_and_cause(files, name, error, cause):
    path = files[name]
    with pytest.raises(error) as info:
        index = build_index(path)
        decode_frames_cpu(path, np.arange(index.num_frames), index)
    err = info.value
    assert isinstance(err, VideoError) and err.source == path
    assert path in str(err) and cause in str(err)


def test_builtin_exception_types(files):
    with pytest.raises(FileNotFoundError):
        build_index(files["missing"])
    assert issubclass(VideoTimeoutError, TimeoutError)


@pytest.mark.parametrize("error", [CorruptVideoError, EmptyVideoError, NoVideoStreamError, TruncatedVideoError,
                                   UnsupportedCodecError, VideoNotFoundError, VideoTimeoutError])
def test_errors_survive_pickling(error):
    """Raised in worker processes (DaliDecoder(cut_processes=...)), they must arrive whole: type, file, cause."""
    import pickle

    back = pickle.loads(pickle.dumps(error("clip.mp4", "its moov atom is cut short")))
    assert type(back) is error and back.source == "clip.mp4" and back.cause == "its moov atom is cut short"
    assert str(back) == str(error("clip.mp4", "its moov atom is cut short"))


def test_cut_processes_survive_a_dying_worker():
    """DaliDecoder(cut_processes=...)'s pool (no DALI needed): a worker that dies fails only the call that killed
    it, with an error naming its file; a call in flight at the time is retried on a new pool and succeeds."""
    import operator
    from concurrent.futures import ThreadPoolExecutor

    from keye.video.dali import CutProcesses

    pool = CutProcesses(2)
    try:
        assert pool.run("a.mp4", operator.add, 1, 2) == 3
        with ThreadPoolExecutor(2) as threads:
            innocent = threads.submit(pool.run, "ok.mp4", time.sleep, 1.0)
            time.sleep(0.2)  # the innocent call is running in a worker when the other one kills its own
            with pytest.raises(CorruptVideoError, match="bad.mp4.*worker process died"):
                pool.run("bad.mp4", os._exit, 3)
            assert innocent.result() is None
        assert pool.run("a.mp4", operator.mul, 2, 5) == 10
    finally:
        pool.shutdown()


def test_bytes_sources(files):
    with pytest.raises(EmptyVideoError, match="<bytes>"):
        build_index(b"")
    with pytest.raises(CorruptVideoError, match="<bytes>"):
        build_index(b"\x00" * 5000)
    with pytest.raises(ValueError, match="path or bytes"):
        build_index(12345)


def test_frame_numbers_are_checked_not_padded(files):
    index = build_index(files["good_mp4"])
    for bad in ([60], [-1], [], [[1]], [0.5]):
        with pytest.raises(ValueError, match="decode_frames_cpu"):
            decode_frames_cpu(files["good_mp4"], bad, index)


def test_loader_skips_bad_files_and_goes_on(files):
    order = ["good_mp4", "missing", "empty", "good_mkv", "cut_mp4", "audio", "corrupt_mid", "unknown_codec",
             "garbage", "good_webm"]
    seen = []
    loader = VideoLoader([files[k] for k in order], fps=2, backend="cpu", num_workers=2, prefetch=3,
                         on_error=lambda source, err: seen.append(source))
    samples = list(loader)
    assert [s.source for s in samples] == [files["good_mp4"], files["good_mkv"], files["good_webm"]]
    for s in samples:
        assert s.inputs.patches.dtype == torch.float32 and s.inputs.grid_thw.shape == (len(s.selection), 3)
    kinds = {source: type(err) for source, err in loader.errors}
    assert kinds == {files["missing"]: VideoNotFoundError, files["empty"]: EmptyVideoError,
                     files["cut_mp4"]: TruncatedVideoError, files["audio"]: NoVideoStreamError,
                     files["corrupt_mid"]: CorruptVideoError, files["unknown_codec"]: UnsupportedCodecError,
                     files["garbage"]: CorruptVideoError}
    assert seen == [files[k] for k in order if k in {"missing", "empty", "cut_mp4", "audio", "corrupt_mid",
                                                      "unknown_codec", "garbage"}]


def test_loader_per_file_timeout(files, monkeypatch):
    real = loader_module.decode_frames_cpu

    def stuck_on_webm(source, frames, index, threads=0, deadline=None):
        if str(source).endswith(".webm"):
            time.sleep(3.0)  # a native call that ignores the deadline
        return real(source, frames, index, threads=threads, deadline=deadline)

    monkeypatch.setattr(loader_module, "decode_frames_cpu", stuck_on_webm)
    t0 = time.monotonic()
    loader = VideoLoader([files["good_webm"], files["good_mp4"]], fps=2, backend="cpu", timeout_s=0.5)
    samples = list(loader)
    assert time.monotonic() - t0 < 2.5
    assert [s.source for s in samples] == [files["good_mp4"]]
    ((source, err),) = loader.errors
    assert source == files["good_webm"] and isinstance(err, VideoTimeoutError)


def test_cooperative_deadline(files):
    with pytest.raises(VideoTimeoutError, match="time limit"):
        decode_frames_cpu(files["good_mp4"], np.arange(60), deadline=time.monotonic() - 1)


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc for the resident set size")
def test_no_memory_growth_over_many_decodes(files):
    path = files["good_mp4"]
    index = build_index(path)

    def one_round():
        out = decode_frames_cpu(path, [3, 30, 59], index)
        assert (read_barcode(out) == [3, 30, 59]).all()
        build_index(path)

    for _ in range(30):  # warm up allocator pools
        one_round()
    before = rss_bytes()
    rounds = 3000 if os.environ.get("KEYE_VIDEO_LONG") == "1" else 250
    for _ in range(rounds):  # leaking even the 3 output frames (250 KB) per round would add 60 MiB in 250
        one_round()
    growth = rss_bytes() - before
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over {rounds} decodes"


def test_loader_arguments_and_per_file_sampling(files):
    for kwargs, what in (({"backend": "tpu"}, "backend"), ({"num_workers": 0}, "num_workers"),
                         ({"prefetch": True}, "prefetch"), ({"timeout_s": 0}, "timeout_s")):
        with pytest.raises(ValueError, match=what):
            VideoLoader([files["good_mp4"]], **kwargs)
    loader = VideoLoader([(files["good_webm"], {"times": [0.0, 1.0]}), files["good_mp4"]], fps=1, backend="cpu",
                         preprocess=False)
    a, b = list(loader)
    assert a.selection.frames.tolist() == [0, 33] and (read_barcode(a.frames) == [0, 33]).all()
    assert len(b.selection) == 2 and b.inputs is None and b.frames.dtype == torch.uint8


def test_loader_prefetch_overlaps_decoding_with_the_consumer(files, monkeypatch):
    """Decoding (made to take 0.3 s a file) runs ahead in workers while the consumer computes (0.3 s a file):
    6 files take about 0.3 + 6 * 0.3 s, not 6 * 0.6 s."""
    real = loader_module.decode_frames_cpu

    def slow_decode(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader_module, "decode_frames_cpu", slow_decode)
    paths = [files["good_mp4"], files["good_mkv"], files["good_webm"]] * 2
    t0 = time.monotonic()
    seen = []
    for sample in VideoLoader(paths, fps=2, backend="cpu", num_workers=3, prefetch=3):
        time.sleep(0.3)  # the model's work on this sample
        seen.append(sample.source)
    elapsed = time.monotonic() - t0
    assert seen == paths
    assert elapsed < 3.0, f"no overlap: {elapsed:.2f} s for 6 files (serial would be 3.6 s)"


def test_loader_adaptive_budget(files):
    (plain,) = VideoLoader([files["good_mp4"]], fps=2, backend="cpu")
    (adaptive,) = VideoLoader([files["good_mp4"]], fps=2, backend="cpu", adaptive=True)
    # 2.4 s of video: 0.09 x 184,320 tokens still allows 256 per frame for 4 frames, so sizes agree here...
    assert adaptive.inputs.grid_thw.tolist() == plain.inputs.grid_thw.tolist()
    from keye.processor.budget import VideoBudget

    (tight,) = VideoLoader([files["good_mp4"]], fps=2, backend="cpu", adaptive=True,
                           budget=VideoBudget(min_tokens_per_frame=4, max_tokens_per_frame=256, total_tokens=1000))
    # ...while a 1,000-token budget scaled by 0.09 (90 tokens for 4 frames) shrinks every frame.
    assert tight.inputs.num_tokens <= 90 + 4 < plain.inputs.num_tokens
