#!/usr/bin/env bash
# Download and pack what bench/video_gpu_run.sh needs on a machine without network (PyAV and a slimmed DALI for
# Python 3.12, DALI's pure-Python deps, the 10-minute film's video stream) into $KEYE_VIDEO_CACHE
# (default ~/.cache/keye/video-carry); about 5 minutes on 2 cores, mostly xz -9e. Then run prepare_carry.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
C="${KEYE_VIDEO_CACHE:-$HOME/.cache/keye/video-carry}"; mkdir -p "$C" && cd "$C"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pip download -q --no-deps "${plat[@]}" -d dali nvidia-dali-cuda130==2.4.0
pip download -q --no-deps "${plat[@]}" -d av312 av==18.1.0
for p in astunparse==1.6.3 gast==0.7.0 optree makefun nvtx "libcst>=1.8,<1.9"; do
  pip download -q --no-deps "${plat[@]}" -d deps312 "$p"; done
rm -rf dali_s && mkdir dali_s && (cd dali_s && unzip -q ../dali/nvidia_dali_cuda130-2.4.0-*.whl)
python "$here/dali_slim.py" dali_s
(cd dali_s && tar cf - nvidia nvidia_dali_cuda130-2.4.0.dist-info | xz -T2 -9e > ../dali_slim9.tar.xz)
rm -rf av_x && mkdir av_x && (cd av_x && unzip -q ../av312/av-18.1.0-*.whl && tar cf - av av.libs av-18.1.0.dist-info | xz -T2 -9e > ../av9.tar.xz)
python - <<'PY'
import av
from keye.video.assets import moviepy_files
src = moviepy_files()["bbb.mp4"]
with av.open(str(src)) as i, av.open("bbb_video.mp4", "w") as o:   # video stream copied, audio dropped
    s = o.add_stream_from_template(i.streams.video[0])
    for pk in i.demux(i.streams.video[0]):
        if pk.dts is not None:
            pk.stream = s
            o.mux(pk)
PY
ls -la "$C"/*.xz "$C"/bbb_video.mp4
