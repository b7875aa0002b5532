"""The one dispatch point: kernel (torch.ops.keye.*) or PyTorch reference.

A kernel runs when the extension is loaded, every tensor argument is on a CUDA device, and the
reference is not forced. Force the reference to debug a kernel:
    KEYE_FORCE_REFERENCE=1 python ...        # whole process
    with keye.ops.force_reference(): ...     # one region (per thread)
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from keye._extension import kernels_available

_local = threading.local()


def _forced() -> bool:
    if getattr(_local, "force_reference", 0) > 0:
        return True
    return os.environ.get("KEYE_FORCE_REFERENCE", "0") not in ("", "0")


@contextlib.contextmanager
def force_reference():
    """Run keye ops through their PyTorch references inside this block (this thread only)."""
    _local.force_reference = getattr(_local, "force_reference", 0) + 1
    try:
        yield
    finally:
        _local.force_reference -= 1


def use_kernel(*tensors: torch.Tensor | None) -> bool:
    """Whether an op with these tensor arguments runs its CUDA kernel."""
    if _forced() or not kernels_available():
        return False
    return all(t is None or t.is_cuda for t in tensors)
