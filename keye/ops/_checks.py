"""Argument validation for the Python side (references and wrappers); mirrors csrc/common/check.h.

Every failure raises ValueError naming the op, the argument, what was expected and what arrived.
Value-range checks need a device->host sync on CUDA; they follow keye.ops.index_checks().
"""

from __future__ import annotations

import contextlib
import os

import torch

_index_checks = os.environ.get("KEYE_INDEX_CHECKS", "1") != "0"


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"keye.{op}: {msg}")


def check_tensor(t, op: str, name: str, dtypes: tuple[torch.dtype, ...], dim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(op, f"argument '{name}' must have dtype {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != dim:
        _fail(op, f"argument '{name}' must be {dim}-D {layout}, got shape {list(t.shape)}")


def check_same_device(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        _fail(op, f"argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; "
                  "all tensors must be on one device")


def check_size(t: torch.Tensor, d: int, expected: int, op: str, name: str, what: str) -> None:
    if t.shape[d] != expected:
        _fail(op, f"argument '{name}' has size {t.shape[d]} in dim {d} but {what} is {expected} "
                  f"(shape {list(t.shape)})")


def check_int_arg(value, lo: int, hi: int, op: str, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        _fail(op, f"argument '{name}' must be an int in [{lo}, {hi}], got {value!r}")


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_index_range(t: torch.Tensor, lo: int, hi: int, op: str, name: str) -> None:
    """Raise unless every value of t is in [lo, hi] (skipped when checks are off or a graph is captured)."""
    if not _index_checks or t.numel() == 0 or _capturing(t):
        return
    vmin, vmax = (int(v) for v in torch.aminmax(t))
    if vmin < lo or vmax > hi:
        _fail(op, f"argument '{name}' must hold values in [{lo}, {hi}], found values in [{vmin}, {vmax}] "
                  "(index checks can be disabled with keye.ops.index_checks(False) once inputs are trusted)")


@contextlib.contextmanager
def index_checks(enabled: bool):
    """Turn the value-range checks (which sync with the device) on or off inside this block.

    Applies to the references and, when built, the CUDA kernels (process-wide while the block runs).
    They are always skipped during CUDA graph capture. KEYE_INDEX_CHECKS=0 turns them off at start-up.
    """
    global _index_checks
    from keye._extension import kernels_available

    old = _index_checks
    _index_checks = bool(enabled)
    old_cpp = torch.ops.keye.set_index_checks(bool(enabled)) if kernels_available() else None
    try:
        yield
    finally:
        _index_checks = old
        if old_cpp is not None:
            torch.ops.keye.set_index_checks(old_cpp)
