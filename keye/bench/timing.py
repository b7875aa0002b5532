"""Timing, ceilings and the self-check's error measure for the microbenchmarks.

GPU: CUDA events around each call, L2 flushed before each timed call (so the kernels are measured
reading from HBM, as they would inside a model), median of many runs; kernel_ms: the kernels' own durations
(torch.profiler), without launch overhead. CPU: perf_counter median.
Ceilings measured in the same process: device copy and write bandwidth, and the bf16 GEMM rate.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable

import torch

_FLUSH_BYTES = 256 << 20  # > 4x the H200's 60 MB L2
_QUEUE_AHEAD_CYCLES = 2_000_000  # ~1 ms at the H200's ~2 GHz: longer than the host takes to launch a layer


def median_ms(fn: Callable[[], object], device: torch.device, reps: int = 50, warmup: int = 5) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def median_ms_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, reps: int = 50,
                          warmup: int = 3, queue_ahead: bool = False) -> dict[str, float]:
    """Median time in ms of each fn, measured round-robin: every round calls each fn once (L2 flushed before each
    call), so clock and power drift over a long run weigh on every contender alike. On the H200, back-to-back
    blocks of one kernel then the other differed by up to 17% for the same kernel depending on its position.

    queue_ahead: the GPU spins ~1 ms (torch.cuda._sleep) before the start event, so the host has enqueued all of
    fn's kernels before the GPU reaches them: the time fn takes inside a model, where the previous layer's kernels
    keep the GPU busy while the host launches this one. Without it, the host's launch latency up to fn's first
    kernels is part of the time (the 'one call' figure)."""
    if device.type != "cuda":
        return {name: median_ms(fn, device, reps, warmup) for name, fn in fns.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
    events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                     for _ in range(reps)] for name in fns}
    torch.cuda.synchronize(device)
    for i in range(reps):
        for name, fn in fns.items():
            flush.zero_()
            if queue_ahead:
                torch.cuda._sleep(_QUEUE_AHEAD_CYCLES)
            start, end = events[name][i]
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize(device)
    return {name: statistics.median(s.elapsed_time(e) for s, e in ev) for name, ev in events.items()}


def kernel_ms(fn: Callable[[], object], device: torch.device, match: str | None = None, reps: int = 30,
              warmup: int = 3) -> float:
    """Median over calls of the summed GPU durations of fn's kernels (those whose name contains `match`, or all;
    memcpy / memset records count as kernels): the profiler's CUPTI records, L2 flushed before each call. The
    kernels' own time, without the launch or graph overhead that an event pair around one short call includes (~4 us
    for a graph of one kernel on the H200); DeepGEMM's and FlashMLA's benchmarks report this figure. Raises if no
    kernel is counted (a wrong name must not read as 0 ms)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        raise ValueError(f"kernel_ms: needs a CUDA device, got {device}")
    for _ in range(warmup):
        fn()
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings():  # "Profiler clears events at the end of each cycle": one cycle here
        warnings.simplefilter("ignore", UserWarning)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                flush.zero_()
                torch.cuda._sleep(1)  # a marker kernel: each call's kernels follow one
                fn()
            torch.cuda.synchronize(device)
        events = prof.events()
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    marks = [i for i, e in enumerate(kernels) if "spin_kernel" in e.name] + [len(kernels) + 1]
    calls = []
    for m, nxt in zip(marks, marks[1:]):  # the flush's fill kernel stands just before the next marker
        calls.append(sum(e.device_time for e in kernels[m + 1:nxt - 1] if match is None or match in e.name) / 1e3)
    if not calls or min(calls) <= 0:
        raise RuntimeError(f"kernel_ms: no kernel{' named like ' + repr(match) if match else ''} ran in some call")
    return statistics.median(calls)


def capture_graph(*calls: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of the calls in order; each runs once first, outside the graph (warm-up, lazy allocations)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def layers_that_fit(layer_bytes: int, most: int, device: torch.device, share: float = 0.3) -> int:
    """How many layers' worth of inputs (1..most) fit in `share` of the free device memory: the depth of a
    graph of decode layers with their own weights or caches."""
    return max(1, min(most, int(share * torch.cuda.mem_get_info(device)[0] // layer_bytes)))


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    # ~50 ms of copies first (clocks up). Measured after large allocations were freed it once read 3799 GB/s
    # against 4241-4276 fresh (NOTES.md): measure the ceilings before the workloads.
    ms = median_ms(lambda: dst.copy_(src), device, reps=20, warmup=50)
    return 2 * nbytes / ms / 1e6


def write_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device write-only rate (fill): the ceiling for write-heavy ops such as the permutation scatter."""
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ms = median_ms(lambda: dst.fill_(7), device, reps=20)
    return nbytes / ms / 1e6


def gemm_tflops(device: torch.device, n: int = 8192) -> float:
    """bf16 n x n x n matrix product rate on random data."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, device, reps=20)
    return 2 * n**3 / ms / 1e9


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the self-check before each timing)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
