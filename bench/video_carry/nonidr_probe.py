"""On the GPU machine, with DALI only (no PyAV, no keye import): decode the pieces from prepare_probe.py with
fn.decoders.video (mixed), as keye.video.dali does, and report per piece: time, and for every requested frame the
mean |diff| to PyAV's thumbnail of the frame asked for and the offset of the best-matching reference thumbnail
(0 = the right frame). Then 12 concurrent streams on the IDR pieces (the film split's situation, on copies of one piece).

    PYTHONPATH=<dali site> python3 bench/video_carry/nonidr_probe.py .video_carry/r3
"""

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray


def pipeline():
    @pipeline_def(batch_size=1, num_threads=2, device_id=0, prefetch_queue_depth=1)
    def decode():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1, no_copy=False)
        return fn.decoders.video(encoded, device="mixed", frames=frames)

    pipe = decode()
    pipe.build()
    return pipe


def run(pipe, data, frames, keep=False):
    pipe.feed_input("encoded", [data])
    pipe.feed_input("frames", [frames.astype(np.int32)])
    (out,) = pipe.run()
    if not keep:
        torch.cuda.synchronize()
        return None
    sample = out[0]
    result = torch.empty(tuple(sample.shape()), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream()
    feed_ndarray(sample, result, cuda_stream=stream)
    stream.synchronize()
    return result


def thumbs(frames):
    x = frames.permute(0, 3, 1, 2).float()
    return torch.nn.functional.avg_pool2d(x, 40).permute(0, 2, 3, 1).cpu().numpy()


def main(root):
    with np.load(f"{root}/probe.npz") as npz:  # read it all now: NpzFile is not thread-safe
        meta = dict(npz)
    names = ["A_idr_start", "A_nonidr_start"]
    data = {n: np.fromfile(f"{root}/{n}.mkv", dtype=np.uint8) for n in names}
    report = {}
    pipe = pipeline()
    run(pipe, data["A_idr_start"], np.array([0, 30]))  # warm-up: CUDA context, NVDEC decoder, allocator
    for n in names:
        frames = meta[f"{n}_frames"]
        times = []
        try:
            for _ in range(2):
                t0 = time.perf_counter()
                run(pipe, data[n], frames)
                times.append(time.perf_counter() - t0)
            got = thumbs(run(pipe, data[n], frames, keep=True))
        except Exception as e:  # report what DALI said and go on with a fresh pipeline
            report[n] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            print(n, json.dumps(report[n]), flush=True)
            pipe = pipeline()
            continue
        ref = meta[f"{n}_thumbs"].astype(np.float32)
        diff = np.abs(got - ref).mean(axis=(1, 2, 3))
        # which reference frame does each decoded frame look most like? (offset in requested-frame steps)
        d_all = np.abs(got[:, None] - ref[None]).mean(axis=(2, 3, 4))
        offset = d_all.argmin(axis=1) - np.arange(len(got))
        span = int(frames[-1]) + 1  # NVDEC decodes the piece from its start to the last requested frame
        report[n] = {"requested": len(frames), "piece_frames_to_decode": span, "best_s": round(min(times), 3),
                     "decoded_frames_per_s": round(span / min(times), 1),
                     "mean_abs_diff_max": round(float(diff.max()), 2),
                     "frames_over_8_levels": int((diff > 8).sum()),
                     "frames_not_best_match": int((offset != 0).sum()),
                     "first_offsets": offset[:12].tolist(), "first_diffs": [round(float(d), 1) for d in diff[:12]]}
        print(n, json.dumps(report[n]), flush=True)

    # 12 concurrent streams, each decoding a ~1,300-frame IDR piece (the film split at 12 streams)
    pipes = [pipeline() for _ in range(12)]
    jobs = ["A_idr_start"] * 12
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda k: run(pipes[k], data[jobs[k]], np.array([0, 30])), range(12)))  # warm-up
        for label, job_names in (("12 streams, IDR-start pieces", jobs),
                                 ("12 streams, non-IDR-start piece", ["A_nonidr_start"] * 12)):
            t0 = time.perf_counter()
            try:
                list(pool.map(lambda k: run(pipes[k], data[job_names[k]], meta[f"{job_names[k]}_frames"]),
                              range(12)))
            except Exception as e:
                report[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                print(label, json.dumps(report[label]), flush=True)
                continue
            dt = time.perf_counter() - t0
            decoded = sum(int(meta[f"{j}_frames"][-1]) + 1 for j in job_names)
            report[label] = {"wall_s": round(dt, 3), "frames_decoded": decoded,
                             "aggregate_decoded_frames_per_s": round(decoded / dt, 1),
                             "sampled_frames": int(sum(len(meta[f"{j}_frames"]) for j in job_names))}
            print(label, json.dumps(report[label]), flush=True)
    return report


if __name__ == "__main__":
    out = main(sys.argv[1])
    if len(sys.argv) > 2:
        json.dump(out, open(sys.argv[2], "w"), indent=1)
