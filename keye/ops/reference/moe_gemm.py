"""Specification of the expert GEMMs of an MoE layer, over rows already grouped by expert (keye.ops.moe_route).

offsets [E + 1] int32: expert e owns rows offsets[e]:offsets[e+1] (non-decreasing, within [0, R]). Rows at or
past offsets[E] belong to no expert and come out zero. All products are computed in fp32 and rounded once to the
inputs' dtype (the kernels take bf16).

    moe_grouped_mm(a, b, offsets)            out[r] = a[r] @ b[e]        b [E, K, N] (the checkpoint's x @ W)
    moe_grouped_mm(a, b, offsets, True)      out[r] = a[r] @ b[e].T      b [E, N, K] (data gradient)
    moe_grouped_mm_wgrad(a, dy, offsets)     out[e] = a[rows e].T @ dy[rows e]   [E, M, N], zero if no rows
    moe_swiglu(h)                            silu(h[:, :I]) * h[:, I:]
    moe_decode_gate_up(x, src, top_k, offsets, w) = moe_swiglu over x[src // top_k] @ w[e] without rounding h
    moe_decode_down(a, offsets, w)           = moe_grouped_mm(a, w, offsets)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye.ops._checks import _fail, check_index_range, check_same_device, check_size, check_tensor

FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def check_offsets(offsets, rows: int, experts: int | None, op: str, ref, ref_name: str = "a") -> None:
    check_tensor(offsets, op, "offsets", (torch.int32,), 1, "[E + 1]")
    check_same_device(offsets, ref, op, "offsets", ref_name)
    if offsets.numel() < 2:
        _fail(op, f"argument 'offsets' must hold E + 1 >= 2 values, got {offsets.numel()}")
    if experts is not None:
        check_size(offsets, 0, experts + 1, op, "offsets", "E + 1 (b.size(0) + 1)")
    check_index_range(offsets, 0, rows, op, "offsets")
    check_index_range(offsets[1:] - offsets[:-1], 0, rows, op, "offsets (differences)")


def _groups(offsets: torch.Tensor):
    bounds = offsets.tolist()
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def _grouped(a, b, offsets, trans_b, op) -> torch.Tensor:
    """fp32 [R, N] result (rows outside every expert zero)."""
    check_tensor(a, op, "a", FLOATS, 2, "[R, K]")
    check_tensor(b, op, "b", FLOATS, 3, "[E, N, K]" if trans_b else "[E, K, N]")
    check_same_device(b, a, op, "b", "a")
    check_size(b, 2 if trans_b else 1, a.shape[1], op, "b", "K (a.size(1))")
    check_offsets(offsets, a.shape[0], b.shape[0], op, a)
    n = b.shape[1] if trans_b else b.shape[2]
    out = torch.zeros(a.shape[0], n, dtype=torch.float32, device=a.device)
    for e, r0, r1 in _groups(offsets):
        w = b[e].float()
        out[r0:r1] = a[r0:r1].float() @ (w.T if trans_b else w)
    return out


def moe_grouped_mm(a, b, offsets, trans_b: bool = False) -> torch.Tensor:
    return _grouped(a, b, offsets, trans_b, "moe_grouped_mm").to(a.dtype)


def moe_grouped_mm_wgrad(a, dy, offsets) -> torch.Tensor:
    op = "moe_grouped_mm_wgrad"
    check_tensor(a, op, "a", FLOATS, 2, "[R, M]")
    check_tensor(dy, op, "dy", FLOATS, 2, "[R, N]")
    check_same_device(dy, a, op, "dy", "a")
    check_size(dy, 0, a.shape[0], op, "dy", "the rows of a")
    check_offsets(offsets, a.shape[0], None, op, a)
    out = torch.zeros(offsets.numel() - 1, a.shape[1], dy.shape[1], dtype=torch.float32, device=a.device)
    for e, r0, r1 in _groups(offsets):
        out[e] = a[r0:r1].float().T @ dy[r0:r1].float()
    return out.to(a.dtype)


def _check_gate_up(h, op) -> None:
    check_tensor(h, op, "h", FLOATS, 2, "[R, 2I] (gate columns, then up columns)")
    if h.shape[1] % 2:
        _fail(op, f"argument 'h' must have an even number of columns (2I), got shape {list(h.shape)}")


def _swiglu_fp32(h: torch.Tensor) -> torch.Tensor:
    g, u = h.float().chunk(2, dim=1)
    return F.silu(g) * u


def moe_swiglu(h) -> torch.Tensor:
    _check_gate_up(h, "moe_swiglu")
    return _swiglu_fp32(h).to(h.dtype)


def moe_swiglu_backward(h, d_out, a_out=None) -> torch.Tensor:
    """The gradient w.r.t. h; a_out (optional, [R, I]) also receives moe_swiglu(h)."""
    op = "moe_swiglu_backward"
    _check_gate_up(h, op)
    for name, t in (("d_out", d_out), ("a_out", a_out)):
        if t is None:
            continue
        check_tensor(t, op, name, FLOATS, 2, "[R, I]")
        check_same_device(t, h, op, name, "h")
        check_size(t, 0, h.shape[0], op, name, "the rows of h")
        check_size(t, 1, h.shape[1] // 2, op, name, "I (h.size(1) / 2)")
    g, u = h.float().chunk(2, dim=1)
    d, s = d_out.float(), torch.sigmoid(g)
    # d/dg silu(g) = s (1 + g (1 - s)); tests check this against autograd.
    dh = torch.cat([d * u * s * (1 + g * (1 - s)), d * g * s], dim=1)
    if a_out is not None:
        a_out.copy_(g * s * u)
    return dh.to(h.dtype)


def moe_decode_gate_up(x, src, top_k: int, offsets, w) -> torch.Tensor:
    op = "moe_decode_gate_up"
    check_tensor(x, op, "x", FLOATS, 2, "[T, H]")
    check_tensor(src, op, "src", (torch.int32,), 1, "[R]")
    check_same_device(src, x, op, "src", "x")
    if not isinstance(top_k, int) or top_k < 1:
        _fail(op, f"top_k must be >= 1, got {top_k!r}")
    check_index_range(src, -1, x.shape[0] * top_k - 1, op, "src")
    token = src.long().div(top_k, rounding_mode="floor")
    rows = torch.where((src >= 0).unsqueeze(1), x[token.clamp(min=0)], 0)
    h = _grouped(rows, w, offsets, False, op)
    return _swiglu_fp32(h).to(x.dtype)


def moe_decode_down(a, offsets, w) -> torch.Tensor:
    return _grouped(a, w, offsets, False, "moe_decode_down").to(a.dtype)
