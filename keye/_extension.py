"""Loads the compiled extension (keye/_C*.so) once and remembers why it could not be loaded.

The extension is a plain shared library registering torch.ops.keye.* (no Python module init), so it is
loaded with torch.ops.load_library. A CPU-only install has no library; keye then says so once and uses
the PyTorch references.
"""

from __future__ import annotations

import glob
import os
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_loaded: bool | None = None
_reason: str | None = None


def _load() -> None:
    global _loaded, _reason
    if _loaded is not None:
        return
    _loaded = False
    libs = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")))
    if os.environ.get("KEYE_DISABLE_KERNELS", "0") not in ("", "0"):
        _reason = "disabled by KEYE_DISABLE_KERNELS"
    elif not libs:
        _reason = (
            "the CUDA extension was not built (pure-Python install; rebuild with "
            "`pip install --no-build-isolation .` where nvcc and a CUDA build of torch are present)"
        )
    else:
        import torch

        try:
            torch.ops.load_library(libs[0])
            _loaded = True
        except (OSError, RuntimeError) as e:  # wrong torch ABI, missing CUDA runtime, ...
            _reason = f"loading {os.path.basename(libs[0])} failed: {e}"
    if not _loaded:
        warnings.warn(f"keye: CUDA kernels are unavailable ({_reason}); using PyTorch reference implementations.",
                      RuntimeWarning, stacklevel=2)


def kernels_available() -> bool:
    """True when the compiled extension is loaded (torch.ops.keye.* exist)."""
    _load()
    return bool(_loaded)


def kernels_unavailable_reason() -> str | None:
    """Why the kernels are not available, or None when they are."""
    _load()
    return _reason
