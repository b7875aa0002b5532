"""A loader over many videos: index, sample, decode and preprocess in worker threads ahead of the consumer.

    loader = VideoLoader(paths, fps=2, backend="auto", device="cuda", prefetch=4, timeout_s=120)
    for sample in loader:                   # in input order; bad files are skipped
        model(sample.inputs.patches, sample.inputs.grid_thw, ...)
    loader.errors                           # [(source, VideoError)] for every skipped file

A source is a path, bytes, or (path, {"times": [...]} / {"fps": 1, "start": 10.0, ...}) to sample one file its
own way (those options replace the loader's fps / times / start / end for that file).

Prefetch: up to `prefetch` videos are in flight while the consumer computes. On CUDA each worker decodes and
preprocesses on its own stream and records an event; the consumer's stream waits for that event, so the GPU
overlaps decoding of the next videos with the model's work on this one, without host synchronisation.

Bad files (missing, zero-length, truncated, corrupted, audio-only, unsupported codec, timed out) are reported —
logged on the "keye.video" logger, passed to `on_error`, kept in `errors` — and skipped; the loader goes on.
Only VideoErrors are treated so; a bug (any other exception) propagates.

Per-file timeout: the CPU decoder checks the deadline between frames; in addition the consumer waits at most
`timeout_s` for a file, so even a call stuck inside a native library cannot stall the loader (its thread is then
abandoned, and the file reported as timed out).

backend: "cpu" (PyAV), "gpu" (DALI NVDEC; needs `decoder` or builds a DaliDecoder), "auto" (GPU when DALI and
CUDA are there, CPU otherwise, and CPU for a codec the GPU path refuses, e.g. AV1 on Hopper).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from keye.processor.budget import VideoBudget
from keye.video.cpu import decode_frames_cpu
from keye.video.errors import UnsupportedCodecError, VideoError, VideoTimeoutError
from keye.video.index import build_index, source_name
from keye.video.preprocess import VideoInputs, adaptive_budget, to_model_inputs
from keye.video.sampling import FrameSelection, sample_frames

log = logging.getLogger("keye.video")
BACKENDS = ("cpu", "gpu", "auto")


@dataclass
class VideoSample:
    source: str
    selection: FrameSelection
    frames: torch.Tensor | None        # uint8 [n, H, W, 3] when preprocess=False
    inputs: VideoInputs | None         # when preprocess=True
    ready: object = None               # CUDA event the consumer's stream must wait for (set by the loader)


class VideoLoader:
    def __init__(self, sources, *, fps: float | None = None, times=None, start: float | None = None,
                 end: float | None = None, sampling: dict | None = None, backend: str = "auto",
                 device: str | torch.device = "cpu", decoder=None, num_workers: int = 4, prefetch: int = 4,
                 timeout_s: float = 300.0, preprocess: bool = True, budget: VideoBudget = VideoBudget(),
                 cpu_threads: int = 1, on_error=None, adaptive: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"VideoLoader: backend must be one of {BACKENDS}, got {backend!r}")
        for name, value in (("num_workers", num_workers), ("prefetch", prefetch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VideoLoader: {name} must be an int >= 1, got {value!r}")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"VideoLoader: timeout_s must be > 0, got {timeout_s!r}")
        self.sources = list(sources)
        self.sampling = dict(sampling or {})
        for key, value in (("fps", fps), ("times", times), ("start", start), ("end", end)):
            if value is not None:
                self.sampling[key] = value
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" must compare equal to "cuda:0"
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.backend = backend
        self.num_workers, self.prefetch, self.timeout_s = num_workers, prefetch, float(timeout_s)
        self.decoder = decoder if backend != "cpu" else None
        if backend in ("gpu", "auto") and decoder is None:
            self.decoder = self._default_decoder(backend)
        if backend == "gpu" and self.decoder is None:
            raise RuntimeError("VideoLoader: backend='gpu' needs DALI and a CUDA device")
        self.preprocess, self.budget, self.cpu_threads = preprocess, budget, cpu_threads
        self.on_error = on_error
        self.adaptive = adaptive  # Keye-VL-2.0's duration-adaptive total budget (keye.video.preprocess)
        self.errors: list[tuple[str, VideoError]] = []

    def _default_decoder(self, backend):
        from keye.video.dali import DaliDecoder, dali_available

        if dali_available() is not None or not torch.cuda.is_available():
            return None
        return DaliDecoder(num_streams=self.num_workers if backend == "gpu" else 7)

    # one file, in a worker thread
    def _load(self, source) -> VideoSample:
        deadline = time.monotonic() + self.timeout_s
        options = dict(self.sampling)
        if isinstance(source, tuple):  # (source, sampling options for this file): they replace the loader's
            source, options = source[0], dict(source[1])
        index = build_index(source)
        selection = sample_frames(index, **options)
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(side) if side is not None else nullcontext():
            frames = None
            if self.decoder is not None:
                try:
                    frames = self.decoder.decode(source, selection.frames, index)
                except UnsupportedCodecError:
                    if self.backend != "auto":
                        raise
            if frames is None:
                frames = decode_frames_cpu(source, selection.frames, index, threads=self.cpu_threads,
                                           deadline=deadline)
            if frames.device != self.device:
                if frames.device.type == "cpu" and self.device.type == "cuda":
                    frames = frames.pin_memory().to(self.device, non_blocking=True)
                else:
                    frames = frames.to(self.device)
            budget = adaptive_budget(index.duration, self.budget) if self.adaptive else self.budget
            inputs = to_model_inputs(frames, selection.timestamps, budget=budget) if self.preprocess else None
            ready = None
            if side is not None:
                ready = torch.cuda.Event()
                ready.record(side)
        return VideoSample(source=source_name(source), selection=selection, frames=None if self.preprocess else frames,
                           inputs=inputs, ready=ready)

    def _report(self, source, error: VideoError) -> None:
        name = source_name(source[0] if isinstance(source, tuple) else source)
        self.errors.append((name, error))
        log.warning("keye.video: skipping %s", error)
        if self.on_error is not None:
            self.on_error(name, error)

    def __iter__(self):
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="keye-video-load")
        pending = deque()
        todo = iter(self.sources)
        try:
            for source in todo:
                pending.append((source, pool.submit(self._load, source)))
                if len(pending) >= self.prefetch:
                    break
            while pending:
                source, future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._load, nxt)))
                try:
                    sample = future.result(timeout=self.timeout_s)
                except FutureTimeout:
                    future.cancel()
                    self._report(source, VideoTimeoutError(source_name(source if not isinstance(source, tuple)
                                                                      else source[0]),
                                                           f"no result within {self.timeout_s:g} s"))
                    continue
                except VideoError as e:
                    self._report(source, e)
                    continue
                if sample.ready is not None:
                    consumer = torch.cuda.current_stream(self.device)
                    consumer.wait_event(sample.ready)
                    # Made on the worker's stream, used on the consumer's: tell the caching allocator, so their
                    # memory is not handed to a later worker allocation while the consumer's kernels still read it.
                    tensors = [sample.frames] if sample.inputs is None else \
                        [sample.inputs.patches, sample.inputs.grid_thw, sample.inputs.timestamps]
                    for t in tensors:
                        t.record_stream(consumer)
                yield sample
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

