"""GPU decoding with NVIDIA DALI (nvidia-dali-cuda130, NVDEC): exactly the requested frames, as CUDA uint8 RGB.

One DALI pipeline is one decode stream: `fn.decoders.video(device="mixed", frames=...)` fed through external
sources (encoded bytes + frame list per sample). `DaliDecoder` keeps `num_streams` pipelines and runs them from
as many threads, so several videos (`decode_many`) or several pieces of one long video, cut at random-access
points (`decode_split`), keep the GPU's NVDEC engines busy at once (an H100/H200 has 7). Frames leave DALI with a
device-to-device copy into torch (`feed_ndarray`), never through the host.

Measured on an H200 (NOTES.md): one stream decodes 720p H.264 at ~1,170 frames/s; given a whole long file, a
stream's time grows with the position of its last requested frame, not with the frames it returns, hence the
standalone pieces.

Random-access points: DALI feeds NVDEC through FFmpeg's h264_mp4toannexb / hevc_mp4toannexb filters, which insert
the parameter sets (SPS/PPS) only before IDR (IRAP) pictures, and pairs decoded pictures with packet timestamps
first-in-first-out. A stream that starts at a key-flagged non-IDR I-frame (x264 makes them at scene cuts) has
pictures NVDEC cannot decode until the first IDR, which shifts that pairing: the frames come back mislabelled, and
slowly. Measured on an H200 (bench/video_carry/nonidr_probe.py): a film piece starting at a non-IDR I-frame gave
77 of 103 requested frames wrong (other frames, up to 83 levels mean difference; no error) at 406 decoded
frames/s; the same run cut at the IDR before it gave all 103 right at 1,173 frames/s. So pieces start only at
`VideoIndex.random_access` frames, and GPU decoding refuses (UnsupportedCodecError: the loader then decodes on
the CPU) an H.264/HEVC stream whose first key frame is not one.

Less to decode: `decode` and `decode_split` give DALI pieces without the disposable frames (H.264 non-reference
pictures, `VideoIndex.disposable`) that are not wanted. No picture predicts from them, so every other frame
decodes bit for bit the same (checked on the H200 against the file as it is), and at 2 fps from the 24 fps film
the pieces hold 8,035 frames instead of 14,254 (x264's B-frames outside the pyramid): the film took 1.10 s
instead of 1.68 s at 12 streams.

Frame numbers are the VideoIndex's (presentation order, built with PyAV), which is also DALI's numbering.

Guard against invented frames: DALI pads frames it cannot produce with zeros by default and says nothing
(docs/video-io.md §0.3). So every request is checked against the index first (a frame number past the end is a
ValueError before DALI sees it), frames that the file does not really hold (truncation) are caught by the index
(packets cut by the end of the file raise TruncatedVideoError), and the number of frames DALI returns must equal
the number asked for.

Needs a CUDA device and `nvidia-dali-cuda130`; `device="cpu"` runs the same pipeline on DALI's CPU decoder
(VP8/VP9/MJPEG only in DALI 2.4), which is how this file's wiring is tested on machines without a GPU.
"""

from __future__ import annotations

import queue
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch

from keye.video.cpu import check_frame_indices
from keye.video.errors import CorruptVideoError, UnsupportedCodecError, VideoError
from keye.video.index import VideoIndex, build_index, open_container, read_source

# Codecs sent to NVDEC by default: what DALI 2.4's GPU decoder takes minus AV1, which Hopper's NVDEC (H100/H200)
# lacks (docs/video-io.md §1.1), so AV1 is refused up front with UnsupportedCodecError and keye.video.loader's
# backend="auto" decodes it on the CPU. On Ampere GA10x / Ada / Blackwell pass codecs=GPU_CODECS | {"av1"}.
# Verified on an H200: h264 and hevc (mp4, mkv) and vp9 (webm), frame-exact; nothing else was run there.
GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mjpeg", "mpeg4"})
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})


def dali_available() -> str | None:
    """None if DALI imports, else why not."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        return f"nvidia-dali is not importable ({type(e).__name__}: {e})"
    return None


def _build_pipeline(device: str, device_id: int, num_threads: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=num_threads, device_id=device_id if device != "cpu" else None,
                  prefetch_queue_depth=1)
    def decode_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1, no_copy=False)
        return fn.decoders.video(encoded, device="mixed" if device != "cpu" else "cpu", frames=frames)

    pipe = decode_pipeline()
    pipe.build()
    return pipe


class _Stream:
    """One pipeline; used by one thread at a time."""

    def __init__(self, device: str, device_id: int, num_threads: int):
        self.args = (device, device_id, num_threads)
        self.pipe = _build_pipeline(*self.args)

    def decode(self, data: np.ndarray, frames: np.ndarray, name: str, codec: str) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        try:
            self.pipe.feed_input("encoded", [data])
            self.pipe.feed_input("frames", [frames.astype(np.int32)])
            (out,) = self.pipe.run()
        except Exception as e:  # DALI raises RuntimeError with the backend's message
            self.pipe = _build_pipeline(*self.args)  # a pipeline that failed is not reused
            text = str(e)
            if any(k in text.lower() for k in ("not supported", "unsupported", "does not support", "no decoder",
                                               "codec")):
                raise UnsupportedCodecError(name, f"DALI cannot decode {codec} here: {text.splitlines()[0]}") from e
            raise CorruptVideoError(name, f"DALI failed to decode: {text.splitlines()[0]}") from e
        sample = out[0]
        shape = tuple(sample.shape())
        if len(shape) != 4 or shape[0] != len(frames) or shape[-1] != 3:
            raise CorruptVideoError(name, f"DALI returned {shape} for {len(frames)} requested frames (refusing "
                                          "padded or partial output)")
        device = "cpu" if self.args[0] == "cpu" else f"cuda:{self.args[1]}"
        result = torch.empty(shape, dtype=torch.uint8, device=device)
        stream = torch.cuda.current_stream(result.device) if result.is_cuda else None
        feed_ndarray(sample, result, cuda_stream=stream)
        if stream is not None:
            # The pipeline reuses its output buffer on the next run; the copy must be done before that.
            stream.synchronize()
        return result


class DaliDecoder:
    """`num_streams` concurrent DALI decode pipelines on one GPU (device="gpu") or on the CPU (device="cpu",
    for tests). Thread-safe: each call takes a free pipeline.

    `cut_processes`: cut `decode`'s thinned pieces in that many worker processes instead of the calling threads.
    For a batch of videos (`decode_many`) the cutting is Python/PyAV work that holds the GIL, so in threads the
    clips are cut one at a time while streams wait. Measured on the H200 (32 clips of 15 s, 720p H.264, 16
    streams, same run; NOTES.md): 1.154 s cut in the threads, 0.921 s in 8 processes, 0.820 s with every piece cut
    beforehand (NVDEC alone). The processes are started when the decoder is made (a few seconds, ~0.3 GB each)."""

    def __init__(self, num_streams: int = 7, device: str = "gpu", device_id: int = 0, threads_per_stream: int = 2,
                 codecs=None, cut_processes: int = 0):
        why = dali_available()
        if why is not None:
            raise RuntimeError(f"DaliDecoder: {why}")
        if device not in ("gpu", "cpu"):
            raise ValueError(f"DaliDecoder: device must be 'gpu' or 'cpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("DaliDecoder: device='gpu' needs CUDA, and torch sees no CUDA device")
        if isinstance(num_streams, bool) or not isinstance(num_streams, int) or num_streams < 1:
            raise ValueError(f"DaliDecoder: num_streams must be an int >= 1, got {num_streams!r}")
        if isinstance(cut_processes, bool) or not isinstance(cut_processes, int) or cut_processes < 0:
            raise ValueError(f"DaliDecoder: cut_processes must be an int >= 0, got {cut_processes!r}")
        self.device = device
        self.codecs = frozenset(codecs) if codecs is not None else GPU_CODECS if device == "gpu" else CPU_CODECS
        self._free: queue.Queue[_Stream] = queue.Queue()
        for _ in range(num_streams):
            self._free.put(_Stream(device, device_id, threads_per_stream))
        self.num_streams = num_streams
        self._pool = ThreadPoolExecutor(num_streams, thread_name_prefix="keye-dali")
        self._cutter = ThreadPoolExecutor(1, thread_name_prefix="keye-dali-cut")  # decode_split's pieces
        # decode's pieces: cut in the calling thread (PyAV holds the GIL for much of it, so concurrent decode calls
        # cut one at a time), or in `cut_processes` worker processes, started and warmed up here.
        self._cut_pool = CutProcesses(cut_processes) if cut_processes else None

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._cutter.shutdown(wait=True)
        if self._cut_pool is not None:
            self._cut_pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _decode_sorted(self, data: np.ndarray, frames: np.ndarray, index: VideoIndex,
                       profile: dict | None = None) -> torch.Tensor:
        stream = self._free.get()
        try:
            if profile is not None:
                profile["decode_start"] = time.perf_counter()
            return stream.decode(data, frames, index.source, index.codec)
        finally:
            if profile is not None:
                profile["decode_end"] = time.perf_counter()
            self._free.put(stream)

    def _prepare(self, source, frames, index: VideoIndex | None) -> tuple[VideoIndex, np.ndarray]:
        index = build_index(source) if index is None else index
        frames = check_frame_indices(index, frames, "DaliDecoder")
        if index.codec not in self.codecs:
            raise UnsupportedCodecError(index.source, f"codec {index.codec} is not decoded by DALI on {self.device}")
        if self.device == "gpu":
            check_nvdec_start(index)
        return index, frames

    def decode(self, source, frames, index: VideoIndex | None = None, drop_disposable: bool = True,
               profile: dict | None = None) -> torch.Tensor:
        """uint8 [len(frames), H, W, 3] on the decoder's device, in the order of `frames`. `drop_disposable`: if
        leaving out the disposable frames that are not wanted (and those before the random-access point at or
        before the first wanted frame) leaves less to decode, DALI gets that piece (`cut_piece`) instead of the
        file: the same frames bit for bit. `profile`: a dict that gets the call's timeline (perf_counter seconds:
        start, cut_end, decode_start, decode_end), the frames DALI decodes and the bytes it is given."""
        start = time.perf_counter()
        index, frames = self._prepare(source, frames, index)
        wanted, inverse = np.unique(frames, return_inverse=True)
        piece = None
        if drop_disposable:
            piece = (_thinned_piece(source, index, wanted) if self._cut_pool is None else
                     self._cut_pool.run(index.source, _thinned_piece, source, index, wanted))
        if piece is None:
            data, local = np.frombuffer(read_source(source), dtype=np.uint8), wanted
        else:
            data, local = np.frombuffer(piece[0], dtype=np.uint8), piece[1]
        cut_end = time.perf_counter()
        out = self._decode_sorted(data, local, index, profile)
        if profile is not None:
            profile.update(start=start, cut_end=cut_end, bytes=len(data), cut=piece is not None,
                           frames_decoded=decode_cost(index, wanted) if piece is not None else int(wanted[-1]) + 1)
        return out[torch.as_tensor(inverse, device=out.device)] if len(wanted) != len(frames) or \
            (np.diff(frames) < 0).any() else out

    def decode_many(self, requests, drop_disposable: bool = True, profile: list | None = None) -> list:
        """requests: iterable of (source, frames, index or None). Decodes them concurrently over the streams (each
        as `decode` does). Returns one entry per request: the frames tensor, or the VideoError that file raised.
        `profile`: a list that gets one `decode` profile dict per request, in request order."""
        requests = list(requests)
        dicts = [{} if profile is not None else None for _ in requests]
        futures = [self._pool.submit(self._decode_or_error, *r, drop_disposable=drop_disposable, profile=d)
                   for r, d in zip(requests, dicts)]
        outs = [f.result() for f in futures]
        if profile is not None:
            profile.extend(dicts)
        return outs

    def _decode_or_error(self, source, frames, index=None, drop_disposable=True, profile=None):
        try:
            return self.decode(source, frames, index, drop_disposable, profile)
        except VideoError as e:
            return e

    def decode_split(self, source, frames, index: VideoIndex | None = None, parts: int | None = None,
                     drop_disposable: bool = True, profile: list | None = None) -> torch.Tensor:
        """Like `decode`, for one long video: the sorted frames are cut into up to `parts` (default: the number of
        streams) runs at random-access points, balanced by the frames each run must decode (`decode_cost`); each
        run's packets are copied (no re-encoding) into a standalone Matroska piece — without the disposable
        frames it does not want (`drop_disposable`; see `cut_piece`) — and the pieces are decoded concurrently,
        then joined on the device. More parts than streams make a work queue: a stream that is done takes the
        next piece, largest first. One thread cuts the pieces in that order while the streams decode.
        `profile`: a list to which one dict per piece is appended (times in seconds from the call's start).

        Why pieces and not the whole file per run: measured on an H200 (DALI 2.4, 720p H.264, 10-minute film),
        giving every stream the whole file with its own frame list took the same 12 s with 1, 7 or 12 streams —
        the time of one sequential decode of the film (DALI appears to decode from the start of the stream up to
        the last requested frame). A piece holds only its own groups of pictures."""
        t0 = time.perf_counter()
        index, frames = self._prepare(source, frames, index)
        wanted, inverse = np.unique(frames, return_inverse=True)
        runs = split_at_random_access(index, wanted, parts or self.num_streams, drop_disposable=drop_disposable)
        costs = [decode_cost(index, run, drop_disposable) for run in runs]
        order = sorted(range(len(runs)), key=lambda i: -costs[i])
        cuts = self._cut_in_order(source, index, [runs[i] for i in order], drop_disposable)
        whole = []  # the file's bytes, read once if some run cannot be cut

        def decode_piece(k, cut):
            run = runs[order[k]]
            try:
                piece, local, (cut_start, cut_end) = cut.result()
            except NotCuttableError:  # this run decodes from the whole file instead (correct, just slower)
                if not whole:
                    whole.append(np.frombuffer(read_source(source), dtype=np.uint8))
                piece, local, cut_start, cut_end = None, run, None, None
            start = time.perf_counter()
            data = whole[0] if piece is None else np.frombuffer(piece, dtype=np.uint8)
            out = self._decode_sorted(data, local, index)
            if profile is not None:
                profile.append({"piece": order[k], "frames": len(run), "cost": costs[order[k]],
                                "bytes": len(data), "cut": piece is not None,
                                "cut_start_s": None if cut_start is None else round(cut_start - t0, 4),
                                "cut_end_s": None if cut_end is None else round(cut_end - t0, 4),
                                "decode_start_s": round(start - t0, 4),
                                "decode_end_s": round(time.perf_counter() - t0, 4)})
            return out

        futures = [self._pool.submit(decode_piece, k, cut) for k, cut in enumerate(cuts)]
        outs = [None] * len(runs)
        for k, f in enumerate(futures):
            outs[order[k]] = f.result()
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        if len(wanted) == len(frames) and not (np.diff(frames) < 0).any():
            return out  # asked sorted and unique: already in order
        return out[torch.as_tensor(inverse, device=out.device)]

    def _cut_in_order(self, source, index: VideoIndex, runs: list[np.ndarray], drop_disposable: bool) -> list:
        """Futures of (piece bytes, local frame numbers, (start, end) perf_counter times), resolved one by one, in
        the order of `runs`, by the cutting thread (PyAV holds the GIL for much of the work, so more cutting
        threads would not cut faster, only finish the first piece later)."""
        futures = [Future() for _ in runs]

        def cut_all():
            try:
                container, _ = open_container(source)  # once: parsing a long MP4's index takes milliseconds
            except BaseException as e:  # handed to the decoding threads, which raise it
                for future in futures:
                    future.set_exception(e)
                return
            with container:
                for run, future in zip(runs, futures):
                    start = time.perf_counter()
                    try:
                        piece, local = _cut_piece_from(container, index, run, drop_disposable)
                    except BaseException as e:
                        future.set_exception(e)
                    else:
                        future.set_result((piece, local, (start, time.perf_counter())))

        self._cutter.submit(cut_all)
        return futures


def check_nvdec_start(index: VideoIndex) -> None:
    """UnsupportedCodecError unless NVDEC (through DALI) can start this stream: its first key frame must be a
    random-access point (IDR / IRAP for H.264 / HEVC; see the module doc)."""
    first_key = int(np.flatnonzero(index.keyframe)[0])
    if not index.random_access_points[first_key]:
        raise UnsupportedCodecError(index.source, f"its {index.codec} stream starts at a key frame that is not an "
                                                  "IDR/IRAP picture; DALI (NVDEC) would return mislabelled frames "
                                                  "until the first IDR, so it is left to the CPU decoder")


class CutProcesses:
    """Worker processes for cutting pieces, each its own one-process pool (spawned: the parent has CUDA threads),
    warmed up at construction. A call takes a free worker, so a worker that dies (a native crash inside FFmpeg)
    fails only the call that was running in it: that call raises CorruptVideoError naming its file, and the
    worker is replaced. Nothing is cut in the parent, where such a crash would take the process down."""

    def __init__(self, processes: int):
        pools = [self._spawn() for _ in range(processes)]
        for warm in [pool.submit(_warm_cut_worker, 0) for pool in pools]:
            warm.result()
        self._free: queue.Queue[ProcessPoolExecutor] = queue.Queue()
        for pool in pools:
            self._free.put(pool)
        self.processes = processes

    @staticmethod
    def _spawn() -> ProcessPoolExecutor:
        import multiprocessing

        return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def run(self, name: str, fn, *args):
        """fn(*args) in a free worker; CorruptVideoError naming `name` if the worker dies running it."""
        from concurrent.futures.process import BrokenProcessPool

        pool = self._free.get()
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as e:
            pool.shutdown(wait=False)
            pool = self._spawn()
            raise CorruptVideoError(name, "a worker process died while cutting it (a crash inside FFmpeg/PyAV)") \
                from e
        finally:
            self._free.put(pool)

    def shutdown(self) -> None:
        for _ in range(self.processes):
            self._free.get().shutdown(wait=True)


def _warm_cut_worker(_) -> None:
    """Run once in each cut process before timing matters: the imports a cut needs (PyAV, this module)."""
    import av  # noqa: F401


def _thinned_piece(source, index: VideoIndex, wanted: np.ndarray) -> tuple[bytes, np.ndarray] | None:
    """cut_piece(source, index, wanted) if it holds fewer frames to decode than the file up to wanted[-1], else
    None (also when the stream cannot be cut: then the file is decoded as it is)."""
    if index.disposable is None:
        return None
    try:
        if decode_cost(index, wanted) >= int(wanted[-1]) + 1:
            return None
        return cut_piece(source, index, wanted)
    except CorruptVideoError:  # NotCuttableError, or frames before the first random-access point: as before
        return None


def decode_cost(index: VideoIndex, run: np.ndarray, drop_disposable: bool = True) -> int:
    """Frames a decoder decodes to produce the sorted frames `run` from a piece that starts at the random-access
    point at or before run[0] (what `cut_piece` makes): every frame from there to run[-1], less the disposable ones
    not in `run` when `drop_disposable`. (The piece may also hold a reference frame or two shown after run[-1],
    which B-frames before it predict from; not counted.)"""
    key = int(index.random_access_at_or_before(run[:1])[0])
    kept = _kept_before(index, drop_disposable)
    dropped_wanted = 0 if kept is None or index.disposable is None else int(index.disposable[run].sum())
    return int(run[-1]) + 1 - key if kept is None else int(kept[run[-1] + 1] - kept[key]) + dropped_wanted


def _kept_before(index: VideoIndex, drop_disposable: bool) -> np.ndarray | None:
    """int64 [N + 1]: frames before each position that a piece keeps whether wanted or not (the non-disposable
    ones), or None when every frame is kept."""
    if not drop_disposable or index.disposable is None:
        return None
    return np.r_[0, np.cumsum(~index.disposable)]


def split_at_random_access(index: VideoIndex, wanted: np.ndarray, parts: int, starts: str = "random_access",
                           drop_disposable: bool = True) -> list[np.ndarray]:
    """Cut sorted unique frame numbers into min(parts, groups) consecutive runs, each starting a new group of
    pictures (the wanted frames that share a start) at a random-access point (starts="keyframe": at any key
    frame; only for decoders that can start there, such as FFmpeg's), such that the largest decoding work of a
    run (`decode_cost`: frames from the run's start to its last frame, less the unwanted disposable ones when
    `drop_disposable`) is as small as cuts between groups allow."""
    if starts not in ("random_access", "keyframe"):
        raise ValueError(f"split_at_random_access: starts must be 'random_access' or 'keyframe', got {starts!r}")
    if isinstance(parts, bool) or not isinstance(parts, (int, np.integer)) or parts < 1:
        raise ValueError(f"split_at_random_access: parts must be an int >= 1, got {parts!r}")
    keys = index.random_access_at_or_before(wanted) if starts == "random_access" else \
        index.keyframe_at_or_before(wanted)
    first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])        # each group's first wanted frame
    last = wanted[np.r_[first[1:], len(wanted)] - 1]                    # and its last
    kept = _kept_before(index, drop_disposable)
    kept = np.arange(index.num_frames + 1) if kept is None else kept
    wanted_dropped = np.zeros(len(wanted) + 1, dtype=np.int64) if index.disposable is None or not drop_disposable \
        else np.r_[0, np.cumsum(index.disposable[wanted])]
    run_end = np.r_[first[1:], len(wanted)]
    groups = len(first)
    parts = min(int(parts), groups)

    def cost(i, g):  # work of a run of groups i..g
        return int(kept[last[g] + 1] - kept[keys[first[i]]] + wanted_dropped[run_end[g]] - wanted_dropped[first[i]])

    def fill(limit):  # greedy runs of work <= limit, leaving at least one group for each run still to start
        cuts, i = [], 0
        for g in range(groups):
            later = parts - len(cuts) - 1
            if g > i and later > 0 and (cost(i, g) > limit or groups - g == later):
                cuts.append(g)
                i = g
            if cost(i, g) > limit:
                return None
        return cuts

    lo, hi = max(cost(g, g) for g in range(groups)), cost(0, groups - 1)  # smallest feasible limit, by bisection
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fill(mid) is not None else (mid + 1, hi)
    bounds = [int(first[g]) for g in fill(lo)] + [len(wanted)]
    return [wanted[a:b] for a, b in zip([0] + bounds[:-1], bounds)]


class NotCuttableError(CorruptVideoError):
    """The video cannot be cut into standalone pieces: a picture shown before its group's key frame (open GOP,
    e.g. HEVC CRA), or a stream the Matroska muxer cannot copy (PyAV's AV1 decoder stream, libdav1d)."""


def cut_piece(source, index: VideoIndex, run: np.ndarray, drop_disposable: bool = True) -> tuple[bytes, np.ndarray]:
    """A standalone Matroska file with the packets that frames `run` (sorted global frame numbers) need: from the
    random-access point (IDR/IRAP; see the module doc) at or before run[0], in decode order, until every frame up
    to run[-1] is in. Returns the bytes and the run's frame numbers inside the piece. Packets are copied, not
    re-encoded. A picture that precedes its key frame in presentation order (open GOP) would shift the piece's
    numbering: then NotCuttableError is raised rather than a wrong piece returned.

    `drop_disposable`: leave out the frames of `index.disposable` (non-reference pictures) that `run` does not
    want. No other picture predicts from them, so every frame left decodes bit for bit as in the whole file, and
    the decoder has that much less to do (at 2 fps from a 24 fps x264 film: ~45 % fewer frames)."""
    container, _ = open_container(source)
    with container:
        return _cut_piece_from(container, index, run, drop_disposable)


def _cut_piece_from(container, index: VideoIndex, run: np.ndarray, drop_disposable: bool) -> tuple[bytes, np.ndarray]:
    """cut_piece from an open container (seeks it; several pieces may be cut from one container in turn)."""
    import io

    import av

    key = int(index.random_access_at_or_before(run[:1])[0])
    last = int(run[-1])
    pts_key = int(index.pts[key])
    droppable = np.zeros(index.num_frames, dtype=bool)
    if drop_disposable and index.disposable is not None:
        droppable[key:] = index.disposable[key:]
        droppable[run] = False
    span = slice(key, last + 1)
    missing = set(index.pts[span][~droppable[span]].tolist())
    dropped = set(index.pts[span][droppable[span]].tolist())
    kept = []
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as dst:
        vs = container.streams.video[0]
        try:
            out = dst.add_stream_from_template(vs)
        except (av.error.FFmpegError, ValueError) as e:  # av.codec.codec.UnknownCodecError is a ValueError
            raise NotCuttableError(index.source, f"cannot copy its {index.codec} stream into a piece: {e}") from e
        container.seek(pts_key, stream=vs, backward=True, any_frame=False)
        started = False
        for packet in container.demux(vs):
            if packet.size == 0 or packet.pts is None or getattr(packet, "is_discard", False):
                continue
            pts = int(packet.pts)
            if not started:
                if not (packet.is_keyframe and pts == pts_key):
                    continue  # the seek landed on an earlier key frame
                started = True
            if pts < pts_key:
                raise NotCuttableError(index.source, "open-GOP pictures before a key frame; cannot cut it into "
                                                 "independent pieces")
            if pts in dropped or (pts > index.pts[last] and _is_droppable_after(index, droppable, pts)):
                continue
            kept.append(pts)
            missing.discard(pts)
            packet.stream = out
            dst.mux(packet)
            if not missing:
                break
    if missing:
        raise CorruptVideoError(index.source, f"cutting frames {run[0]}..{last}: {len(missing)} of their packets "
                                              "were not found after seeking")
    local = np.searchsorted(np.sort(np.asarray(kept, dtype=np.int64)), index.pts[run])
    return buf.getvalue(), local.astype(np.int64)


def _is_droppable_after(index: VideoIndex, droppable: np.ndarray, pts: int) -> bool:
    """For a packet shown after the run's last frame (decoded before it, e.g. the reference of its B-frames)."""
    i = int(np.searchsorted(index.pts, pts))
    return i < index.num_frames and int(index.pts[i]) == pts and bool(droppable[i])
