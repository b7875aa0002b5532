"""Video decoding benchmark: DALI (NVDEC, GPU tensors) against PyAV and OpenCV on all CPU cores, same run.

    python bench/video_bench.py --film bbb.mp4 --clips a.mp4 b.mp4 ... --out results.json

Two workloads, both sampled at 2 fps with keye.video.sampling (Keye-VL-2.0 rule):
  film:  one long video (the 10-minute 720p Big Buck Bunny), end to end: index, sample, decode, and for DALI also
         resize + normalise + patchify into model-ready GPU tensors. DALI splits it at IDR frames into pieces
         without the unwanted disposable (non-reference) frames, over its streams (work queue when there are more
         pieces than streams), and reports where the time went (cutting, decoding, idle streams, preprocessing);
         every split must give the first split's frames bit for bit. The CPU baselines split it at key frames
         over their worker processes and decode every frame.
  clips: a batch of short videos (15 s pieces cut from the film without re-encoding, plus the given clips); DALI
         gets each clip without its unwanted disposable frames (DaliDecoder.decode), and once as it is; then, at
         --clip-streams streams, with the pieces cut in worker processes (--cut-processes), with every piece cut
         beforehand (the NVDEC side alone: the ceiling of this design), and through VideoLoader (index, sample,
         decode, preprocess per file). Each DALI clip row says where its time went (cutting, decoding, idle
         streams, preprocessing).
CPU baselines return only a checksum from each worker (frames stay in the worker), which flatters them: their
frames would still have to be resized, normalised and copied to the GPU.
Reported: frames/s (sampled frames delivered), videos/min, wall seconds, and NVDEC utilisation sampled with NVML
during the DALI runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


# ---- CPU workers (run in spawned processes) ----

def _pyav_worker(args):
    path, frames, index = args
    from keye.video.cpu import decode_frames_cpu

    out = decode_frames_cpu(path, frames, index, threads=1)
    return int(out.shape[0]), int(out[:, ::64, ::64].sum())


def _opencv_worker(args):
    path, frames = args
    import cv2

    cv2.setNumThreads(1)
    cap = cv2.VideoCapture(path)
    wanted = sorted(set(int(f) for f in frames))
    first = wanted[0]
    if first > 0:
        cap.set(cv2.CAP_PROP_POS_FRAMES, first)  # OpenCV seeks to a key frame and decodes forward itself
    pos, got, checksum = first, 0, 0
    want = set(wanted)
    while pos <= wanted[-1]:
        if not cap.grab():
            break
        if pos in want:
            ok, img = cap.retrieve()
            if ok:
                rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
                got += 1
                checksum += int(rgb[::64, ::64].sum())
        pos += 1
    cap.release()
    return got, checksum


def _noop(_):
    return os.getpid()


# ---- helpers ----

class NvdecSampler:
    """Samples NVDEC utilisation (percent) with NVML every 50 ms while active."""

    def __init__(self):
        self.samples, self._stop, self._thread, self.error = [], threading.Event(), None, None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as e:  # no NVML: report why
            self._nvml, self.error = None, f"{type(e).__name__}: {e}"

    def __enter__(self):
        self.samples.clear()
        self._stop.clear()
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self._nvml.nvmlDeviceGetDecoderUtilization(self._handle)[0])
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                return
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self):
        if not self.samples:
            return {"nvdec_util_mean": None, "nvdec_util_max": None, "nvml_error": self.error}
        return {"nvdec_util_mean": round(statistics.mean(self.samples), 1), "nvdec_util_max": max(self.samples)}


def cut_clips(film: str, film_index, out_dir: str, count: int, seconds: float) -> list[str]:
    """`count` pieces of `seconds` each from the film, copied packet by packet (no re-encode), each starting at a
    random-access point (IDR), as a standalone file from an encoder does: 73 of the film's 190 key frames are
    non-IDR I-frames, which NVDEC through DALI cannot start at (keye/video/dali.py)."""
    import av

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    ra = np.flatnonzero(film_index.random_access_points)
    with av.open(film) as src:
        vs = src.streams.video[0]
        tb = float(vs.time_base)
        starts = np.linspace(0, film_index.duration - seconds - 1, count)
        for k, start in enumerate(starts):
            path = os.path.join(out_dir, f"clip{k:03d}.mp4")
            first = ra[np.searchsorted(film_index.timestamps[ra], start, side="right") - 1]
            first_pts = int(film_index.pts[first])
            src.seek(first_pts, stream=vs, backward=True)
            with av.open(path, "w") as dst:
                out = dst.add_stream_from_template(vs)
                t0 = None
                for packet in src.demux(vs):
                    if packet.dts is None or packet.pts is None:
                        continue
                    if t0 is None:
                        if not (packet.is_keyframe and packet.pts == first_pts):
                            continue
                        t0 = packet.pts
                    if (packet.pts - t0) * tb >= seconds:
                        break
                    packet.pts -= t0
                    packet.dts -= t0
                    packet.stream = out
                    dst.mux(packet)
            paths.append(path)
    return paths


def run_clips(decoder, requests, drop_disposable=True):
    """requests: [(path, index, selection)]. Decode concurrently + preprocess each video to model inputs on the
    GPU. Returns (frames, tokens, frames tensors, phases: where the wall time went)."""
    import torch

    from keye.video.preprocess import to_model_inputs

    profile = []
    t0 = time.perf_counter()
    outs = decoder.decode_many([(p, s.frames, ix) for p, ix, s in requests], drop_disposable=drop_disposable,
                               profile=profile)
    t1 = time.perf_counter()
    bad = [o for o in outs if isinstance(o, Exception)]
    if bad:
        raise bad[0]
    tokens = 0
    for (path, index, sel), frames in zip(requests, outs):
        tokens += to_model_inputs(frames, sel.timestamps).num_tokens
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (sum(len(s.frames) for _, _, s in requests), tokens, outs,
            clip_phases(profile, decoder.num_streams, t0, t1, t2))


def clip_phases(profile, streams, t0, t1, t2):
    """Where decode_many's wall time went (seconds from the call's start), from its per-clip profiles."""
    rel = lambda key: [p[key] - t0 for p in profile]
    starts, ends = rel("decode_start"), rel("decode_end")
    busy = sum(e - s for s, e in zip(starts, ends))
    decoded = sum(p["frames_decoded"] for p in profile)
    return {"clips": len(profile), "frames_decoded": decoded, "piece_mb": round(sum(p["bytes"] for p in profile) / 1e6, 1),
            "cut_busy_s": round(sum(p["cut_end"] - p["start"] for p in profile), 3),
            "first_decode_start_s": round(min(starts), 3), "last_decode_start_s": round(max(starts), 3),
            "first_decode_end_s": round(min(ends), 3), "last_decode_end_s": round(max(ends), 3),
            "decode_busy_stream_s": round(busy, 3), "stream_idle_s": round(streams * max(ends) - busy, 3),
            "decoded_frames_per_busy_stream_s": round(decoded / busy, 1),
            "decoded_frames_per_s_while_decoding": round(decoded / (max(ends) - min(starts)), 1),
            "decode_many_s": round(t1 - t0, 3), "preprocess_s": round(t2 - t1, 3)}


def run_precut(decoder, pieces):
    """The NVDEC side alone: pieces cut beforehand [(data, local frames, index)], decoded over the streams."""
    import torch

    futures = [decoder._pool.submit(decoder._decode_sorted, data, local, ix) for data, local, ix in pieces]
    outs = [f.result() for f in futures]
    torch.cuda.synchronize()
    return outs


def run_loader(decoder, paths, streams):
    """keye.video.VideoLoader over the clips as a user runs it: index, sample, decode, preprocess per file in
    worker threads, everything in flight at once."""
    import torch

    from keye.video import VideoLoader

    frames = tokens = 0
    for sample in VideoLoader(paths, fps=2, backend="gpu", device="cuda", decoder=decoder, num_workers=streams,
                              prefetch=len(paths)):
        frames += len(sample.selection.frames)
        tokens += sample.inputs.num_tokens
    torch.cuda.synchronize()
    return frames, tokens


def run_film(decoder, film, parts: int, drop_disposable: bool):
    """The film split over the streams into `parts` pieces, then preprocessed to model inputs on the GPU.
    Returns (frames, tokens, frames tensor, phases: where the wall time went)."""
    import torch

    from keye.video.preprocess import to_model_inputs

    ((path, index, sel),) = film
    profile = []
    t0 = time.perf_counter()
    frames = decoder.decode_split(path, sel.frames, index, parts=parts, drop_disposable=drop_disposable,
                                  profile=profile)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    tokens = to_model_inputs(frames, sel.timestamps).num_tokens
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return len(sel.frames), tokens, frames, film_phases(profile, decoder.num_streams, t1 - t0, t2 - t1)


def film_phases(profile, streams, split_s, preprocess_s):
    """Where decode_split's wall time went, from its per-piece profile (seconds from the call's start)."""
    cuts = [p for p in profile if p["cut"]]
    starts = [p["decode_start_s"] for p in profile]
    ends = [p["decode_end_s"] for p in profile]
    busy = sum(e - s for s, e in zip(starts, ends))
    costs = [p["cost"] for p in profile]
    return {"pieces": len(profile), "frames_decoded": sum(costs), "largest_piece_frames": max(costs),
            "smallest_piece_frames": min(costs), "piece_mb": round(sum(p["bytes"] for p in profile) / 1e6, 1),
            "first_piece_cut_s": min((p["cut_end_s"] for p in cuts), default=None),
            "all_pieces_cut_s": max((p["cut_end_s"] for p in cuts), default=None),
            "cutting_busy_s": round(sum(p["cut_end_s"] - p["cut_start_s"] for p in cuts), 3),
            "last_decode_start_s": max(starts), "first_decode_end_s": min(ends), "last_decode_end_s": max(ends),
            "decode_busy_stream_s": round(busy, 3),
            "stream_idle_s": round(streams * max(ends) - busy, 3),  # stream-seconds with no piece before the end
            "decoded_frames_per_busy_stream_s": round(sum(costs) / busy, 1),
            "join_s": round(split_s - max(ends), 3),  # concatenation on the GPU, synchronisation
            "split_decode_s": round(split_s, 3), "preprocess_s": round(preprocess_s, 3)}


def index_and_sample(paths):
    from keye.video import build_index, sample_frames

    out = []
    for p in paths:
        ix = build_index(p)
        out.append((p, ix, sample_frames(ix, fps=2)))
    return out


def timed(fn, repeat):
    """(best s, median s, result of the best run)."""
    times, best = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        if times[-1] == min(times):
            best = result
        del result  # the film's frames are 3.3 GB on the GPU: one copy at a time
    return min(times), statistics.median(times), best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--film", required=True)
    ap.add_argument("--clips", nargs="*", default=[])
    ap.add_argument("--num-clips", type=int, default=32, help="15 s pieces cut from the film")
    ap.add_argument("--clip-seconds", type=float, default=15.0)
    ap.add_argument("--streams", type=int, nargs="+", default=[12, 16, 24], help="DALI stream counts to try")
    ap.add_argument("--pieces-per-stream", type=int, nargs="+", default=[1, 2],
                    help="film pieces per DALI stream to try (more than 1: a work queue over the streams)")
    ap.add_argument("--compare-undropped", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the film and the clips at the first stream count with every frame decoded")
    ap.add_argument("--clip-streams", type=int, default=16,
                    help="stream count for the clip variants: pieces cut in processes, NVDEC alone, VideoLoader")
    ap.add_argument("--cut-processes", type=int, nargs="+", default=[0, 8],
                    help="DaliDecoder(cut_processes=...) values to time on the clips (0: cut in the decode threads)")
    ap.add_argument("--cpu-workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/keye_video_bench")
    ap.add_argument("--out", default="video_bench.json")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-dali", action="store_true", help="CPU baselines only (machines without a GPU)")
    args = ap.parse_args()

    import torch

    from keye.video.dali import DaliDecoder, split_at_random_access

    report = {"host": platform.node(), "cpus": os.cpu_count(), "cpu_workers": args.cpu_workers,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "torch": torch.__version__}
    try:
        import nvidia.dali as nd
        report["dali"] = nd.__version__
    except Exception as e:
        report["dali"] = f"unavailable: {e}"
    import av
    report["pyav"] = av.__version__
    try:
        import cv2
        report["opencv"] = cv2.__version__
    except Exception as e:
        report["opencv"] = f"unavailable: {e}"
    results = []
    report["results"] = results

    def record(**row):
        results.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    t0 = time.perf_counter()
    film = index_and_sample([args.film])
    film_index_s = time.perf_counter() - t0
    (film_path, film_ix, film_sel), = film

    t0 = time.perf_counter()
    clips = cut_clips(args.film, film_ix, os.path.join(args.workdir, "clips"), args.num_clips,
                      args.clip_seconds) + list(args.clips)
    report["clip_cut_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    batch = index_and_sample(clips)
    clips_index_s = time.perf_counter() - t0
    report["film"] = {"frames": film_ix.num_frames, "duration_s": round(film_ix.duration, 2),
                      "sampled": len(film_sel), "index_and_sample_s": round(film_index_s, 3)}
    report["clips"] = {"videos": len(batch), "sampled": sum(len(s.frames) for *_, s in batch),
                       "index_and_sample_s": round(clips_index_s, 3)}
    n_clip_frames = report["clips"]["sampled"]

    # --- DALI ---
    from keye.video.cpu import decode_frames_cpu

    sampler = NvdecSampler()
    film_gpu_frames = None
    reference = None  # the first film split's frames: every other split must give them bit for bit
    for streams in [] if args.skip_dali else args.streams:
        with DaliDecoder(num_streams=streams) as dec:
            run_clips(dec, batch[:2])  # warm-up: pipelines, CUDA context, allocator
            thinned = None
            for drop in (True, False) if streams == args.streams[0] and args.compare_undropped else (True,):
                with sampler:
                    best, med, (n, tokens, outs, phases) = timed(lambda: run_clips(dec, batch, drop), args.repeat)
                what, same = "", None
                if drop:
                    thinned = outs
                else:  # the clips as they are must give the thinned clips' frames bit for bit
                    what, same = ", all frames decoded (disposable ones too)", all(
                        torch.equal(a, b) for a, b in zip(outs, thinned))
                record(workload="clips", method=f"DALI NVDEC x{streams} streams{what} -> model-ready GPU tensors",
                       streams=streams, drop_disposable=drop, frames=n, tokens=tokens, best_s=round(best, 3),
                       median_s=round(med, 3), frames_per_s=round(n / best, 1),
                       videos_per_min=round(len(batch) / best * 60, 1),
                       end_to_end_s_incl_index=round(best + clips_index_s, 3),
                       **({} if same is None else {"bit_equal_to_thinned": same}), clip_phases=phases,
                       **sampler.summary())
                del outs
            del thinned
            configs = [(streams * k, True) for k in args.pieces_per_stream]
            if streams == args.streams[0] and args.compare_undropped:
                configs.append((streams, False))  # what leaving out the disposable frames buys, same split count
            for parts, drop in configs:
                with sampler:
                    best, med, (n, tokens, split_frames, phases) = timed(
                        lambda: run_film(dec, film, parts, drop), args.repeat)
                if reference is None:
                    reference = split_frames
                same = bool(torch.equal(split_frames, reference))
                what = "" if drop else ", all frames decoded (disposable ones too)"
                record(workload="film", method=f"DALI NVDEC x{streams} streams, {parts} pieces{what} -> "
                                               "model-ready GPU tensors",
                       streams=streams, parts=parts, drop_disposable=drop, frames=n, tokens=tokens,
                       best_s=round(best, 3), median_s=round(med, 3), frames_per_s=round(n / best, 1),
                       end_to_end_s_incl_index=round(best + film_index_s, 3), bit_equal_to_first_split=same,
                       max_abs_diff_to_first_split=0 if same else
                       int((split_frames.to(torch.int16) - reference.to(torch.int16)).abs().max()),
                       phases=phases, **sampler.summary())
                if film_gpu_frames is None:
                    # The whole file in one stream (no pieces), up to 1/8 of the film: DALI decodes from the start
                    # to the last frame asked for, ~12 s for all of it.
                    at = np.array([0, len(film_sel) // 20, len(film_sel) // 8])
                    film_gpu_frames = (at, dec.decode(film_path, film_sel.frames[at], film_ix,
                                                      drop_disposable=False).cpu())
                del split_frames
    if not args.skip_dali:
        clip_variants(args, batch, sampler, record)
    if reference is not None:
        # Are the split's frames the right ones? 24 of them against PyAV: a frame mislabelled by the decoder
        # differs by far more than the ~1-2 levels of colour conversion. (Every other split equals this one.)
        at = np.linspace(0, len(film_sel) - 1, 24).astype(int)
        ref = decode_frames_cpu(film_path, film_sel.frames[at], film_ix)
        per_frame = (reference[torch.as_tensor(at, device=reference.device)].cpu().float()
                     - ref.float()).abs().mean(dim=(1, 2, 3))
        report["film_split_vs_cpu"] = {
            "frames": film_sel.frames[at].tolist(), "per_frame_mean_abs_diff": [round(float(d), 2) for d in per_frame],
            "max": round(float(per_frame.max()), 2)}
        print(f"film split vs PyAV, 24 frames: max per-frame mean |diff| {float(per_frame.max()):.2f} levels",
              flush=True)
        # Pieces against the whole file, both on the GPU: the same NVDEC output, so bit for bit.
        at, whole = film_gpu_frames
        report["film_split_vs_whole_file_gpu"] = {
            "frames": film_sel.frames[at].tolist(),
            "bit_equal": bool(torch.equal(reference[torch.as_tensor(at, device=reference.device)].cpu(), whole))}
        print("film split vs whole-file GPU decode:", report["film_split_vs_whole_file_gpu"], flush=True)
        del reference

    # GPU vs CPU on the film: same frames?
    if film_gpu_frames is not None:
        at, gpu = film_gpu_frames
        cpu = decode_frames_cpu(film_path, film_sel.frames[at], film_ix)
        diff = (gpu.float() - cpu.float()).abs()
        report["film_gpu_vs_cpu"] = {"frames": film_sel.frames[at].tolist(),
                                     "mean_abs_diff_levels": round(float(diff.mean()), 3),
                                     "max_abs_diff_levels": float(diff.max()),
                                     "per_frame_mean": [round(float(d), 3) for d in diff.mean(dim=(1, 2, 3))]}

    # --- CPU baselines ---
    if not args.skip_cpu:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(args.cpu_workers, mp_context=ctx) as pool:
            list(pool.map(_noop, range(args.cpu_workers * 2)))  # start every worker before timing
            # FFmpeg can start at any key frame (it has the parameter sets from the container)
            film_runs = split_at_random_access(film_ix, np.unique(film_sel.frames), args.cpu_workers,
                                               starts="keyframe", drop_disposable=False)
            for name, worker, film_jobs, clip_jobs in (
                    ("PyAV", _pyav_worker, [(film_path, r, film_ix) for r in film_runs],
                     [(p, s.frames, ix) for p, ix, s in batch]),
                    ("OpenCV", _opencv_worker, [(film_path, r) for r in film_runs],
                     [(p, s.frames) for p, ix, s in batch])):
                if name == "OpenCV" and not str(report["opencv"])[0].isdigit():
                    continue
                list(pool.map(worker, clip_jobs[:args.cpu_workers]))  # warm-up (imports in each worker)
                best, med, res = timed(lambda: list(pool.map(worker, clip_jobs)), args.repeat)
                got = sum(r[0] for r in res)
                record(workload="clips", method=f"{name}, {args.cpu_workers} processes (frames stay on CPU)",
                       frames=got, expected_frames=n_clip_frames, best_s=round(best, 3), median_s=round(med, 3),
                       frames_per_s=round(got / best, 1), videos_per_min=round(len(batch) / best * 60, 1),
                       end_to_end_s_incl_index=round(best + clips_index_s, 3))
                best, med, res = timed(lambda: list(pool.map(worker, film_jobs)), args.repeat)
                got = sum(r[0] for r in res)
                record(workload="film", method=f"{name}, {args.cpu_workers} processes (frames stay on CPU)",
                       frames=got, expected_frames=len(film_sel), best_s=round(best, 3), median_s=round(med, 3),
                       frames_per_s=round(got / best, 1), end_to_end_s_incl_index=round(best + film_index_s, 3))

    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print_table(report)


def clip_variants(args, batch, sampler, record):
    """The clips at --clip-streams streams: pieces cut in worker processes (each --cut-processes value), the NVDEC
    side alone (pieces cut beforehand: what decoding costs without cutting and preprocessing), and VideoLoader
    (index + sample + decode + preprocess per file, as a user runs it). Frames must equal the first variant's."""
    import torch

    from keye.video.dali import DaliDecoder, _thinned_piece, decode_cost
    from keye.video.index import read_source

    streams, first = args.clip_streams, None
    n_frames = sum(len(s.frames) for *_, s in batch)
    for cp in args.cut_processes:
        with DaliDecoder(num_streams=streams, cut_processes=cp) as dec:
            run_clips(dec, batch[:2])
            with sampler:
                best, med, (n, tokens, outs, phases) = timed(lambda: run_clips(dec, batch), args.repeat)
            first = outs if first is None else first
            record(workload="clips", method=f"DALI NVDEC x{streams} streams, pieces cut in "
                                            f"{f'{cp} processes' if cp else 'the decode threads'} -> model-ready GPU tensors",
                   streams=streams, cut_processes=cp, frames=n, tokens=tokens, best_s=round(best, 3),
                   median_s=round(med, 3), frames_per_s=round(n / best, 1),
                   videos_per_min=round(len(batch) / best * 60, 1),
                   bit_equal_to_first_variant=all(torch.equal(a, b) for a, b in zip(outs, first)),
                   clip_phases=phases, **sampler.summary())
            del outs
    with DaliDecoder(num_streams=streams) as dec:
        pieces = []
        for path, ix, sel in batch:
            wanted = np.unique(sel.frames)
            piece = _thinned_piece(path, ix, wanted)
            data, local = (np.frombuffer(read_source(path), dtype=np.uint8), wanted) if piece is None else \
                (np.frombuffer(piece[0], dtype=np.uint8), piece[1])
            pieces.append((data, local, ix))
        run_precut(dec, pieces[:2])
        with sampler:
            best, med, _ = timed(lambda: run_precut(dec, pieces), args.repeat)
        decoded = sum(decode_cost(ix, np.unique(sel.frames)) for _, ix, sel in batch)
        record(workload="clips", method=f"DALI NVDEC x{streams} streams, pieces cut beforehand (decode only, no "
                                        "preprocessing: the NVDEC side's ceiling)",
               streams=streams, frames=n_frames, frames_decoded=decoded, best_s=round(best, 3),
               median_s=round(med, 3), frames_per_s=round(n_frames / best, 1),
               decoded_frames_per_s=round(decoded / best, 1), videos_per_min=round(len(batch) / best * 60, 1),
               **sampler.summary())
        paths = [p for p, _, _ in batch]
        run_loader(dec, paths[:2], streams)
        with sampler:
            best, med, (n, tokens) = timed(lambda: run_loader(dec, paths, streams), args.repeat)
        record(workload="clips", method=f"VideoLoader (gpu, {streams} workers; index + sample + decode + preprocess "
                                        "per file) -> model-ready GPU tensors",
               streams=streams, frames=n, tokens=tokens, best_s=round(best, 3), median_s=round(med, 3),
               frames_per_s=round(n / best, 1), videos_per_min=round(len(batch) / best * 60, 1), **sampler.summary())


def print_table(report):
    print(f"\n{report.get('gpu')}, {report['cpus']} CPUs; DALI {report.get('dali')}, PyAV {report.get('pyav')}, "
          f"OpenCV {report.get('opencv')}")
    print(f"film: {report['film']}; clips: {report['clips']}")
    print("| workload | method | sampled frames | best s | frames/s | videos/min | NVDEC util mean/max % |")
    print("|---|---|---|---|---|---|---|")
    for r in report["results"]:
        util = "" if "nvdec_util_mean" not in r else f"{r['nvdec_util_mean']}/{r['nvdec_util_max']}"
        print(f"| {r['workload']} | {r['method']} | {r['frames']} | {r['best_s']} | {r['frames_per_s']} | "
              f"{r.get('videos_per_min', '')} | {util} |")
    print("film GPU vs CPU:", report.get("film_gpu_vs_cpu"))
    print("film split vs CPU (max per-frame mean |diff|):", report.get("film_split_vs_cpu", {}).get("max"))
    print("clips as they are bit-equal to the thinned clips:",
          [r["bit_equal_to_thinned"] for r in report["results"] if "bit_equal_to_thinned" in r])
    print("film splits bit-equal to the first:",
          [r.get("bit_equal_to_first_split") for r in report["results"] if "bit_equal_to_first_split" in r])
    first_last = lambda r, ph: f"{ph['first_decode_end_s']} / {ph['last_decode_end_s']}"
    phase_table(report["results"], "clip_phases", [
        ("clips method", lambda r, ph: r["method"]), ("best s", lambda r, ph: r["best_s"]),
        ("frames decoded", "frames_decoded"), ("cut busy s", "cut_busy_s"),
        ("last decode start s", "last_decode_start_s"), ("first / last decode end s", first_last),
        ("stream idle s", "stream_idle_s"), ("decoded frames/s while decoding", "decoded_frames_per_s_while_decoding"),
        ("preprocess s", "preprocess_s")])
    phase_table(report["results"], "phases", [
        ("film method", lambda r, ph: r["method"]), ("best s", lambda r, ph: r["best_s"]), ("pieces", "pieces"),
        ("frames decoded", "frames_decoded"), ("largest piece", "largest_piece_frames"),
        ("all cut by s", "all_pieces_cut_s"), ("last decode start s", "last_decode_start_s"),
        ("first / last decode end s", first_last), ("stream idle s", "stream_idle_s"), ("join s", "join_s"),
        ("preprocess s", "preprocess_s")])


def phase_table(results, key, columns):
    """A markdown table of the rows that have `key` (their phases dict); columns: (header, phases key or
    fn(row, phases))."""
    print("| " + " | ".join(h for h, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in results:
        ph = r.get(key)
        if ph:
            print("| " + " | ".join(str(c(r, ph) if callable(c) else ph[c]) for _, c in columns) + " |")


if __name__ == "__main__":
    main()
