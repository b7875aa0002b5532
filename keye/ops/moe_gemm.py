"""Expert GEMMs over rows grouped by expert: public ops, dispatch, and their torch.library registrations.

    routing = keye.ops.moe_route(ids, num_experts)                    # offsets [E + 1] on the device
    h = keye.ops.moe_grouped_mm(xs, gate_up, routing.offsets)         # [R, 2I]
    a = keye.ops.moe_swiglu(h)                                        # [R, I]
    y = keye.ops.moe_grouped_mm(a, down, routing.offsets)             # [R, H]

Semantics: keye/ops/reference/moe_gemm.py. On CUDA (bf16, Hopper) they run keye's CUTLASS grouped GEMMs and
kernels (csrc/moe_gemm/); nothing is read back to the host, so they can be captured in a CUDA graph.
keye.ops.moe composes them into the differentiable layer; these ops themselves carry no autograd formula.
"""

from __future__ import annotations

import torch

from keye._extension import kernels_available
from keye.ops._dispatch import use_kernel
from keye.ops.reference import moe_gemm as spec


def moe_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, trans_b: bool = False,
                   config: int = -1) -> torch.Tensor:
    """out[r] = a[r] @ b[e] (b [E, K, N]) or a[r] @ b[e].T (trans_b, b [E, N, K]) for the rows of expert e.

    a [R, K] bf16; offsets [E + 1] int32 from moe_route; rows at or past offsets[E] are zero. config selects a
    compiled tile configuration (moe_grouped_gemm_configs), -1 picks one from the rows per expert.
    """
    if use_kernel(a, b, offsets):
        return torch.ops.keye.moe_grouped_mm(a, b, offsets, trans_b, config)
    return spec.moe_grouped_mm(a, b, offsets, trans_b)


def moe_grouped_mm_swiglu(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, config: int = -1) -> torch.Tensor:
    """The gate_up GEMM with SwiGLU in its epilogue: out[r] = silu(g) * u of a[r] @ gate_up[e] in fp32, rounded once
    (h [R, 2I] is never written). b = moe_pack_gate_up(gate_up) [E, K, 2I], I a multiple of 128. Returns [R, I];
    rows at or past offsets[E] are zero. No autograd formula (inference). config: as moe_grouped_mm's, from
    moe_grouped_gemm_configs('fwd_swiglu')."""
    if use_kernel(a, b, offsets):
        return torch.ops.keye.moe_grouped_mm_swiglu(a, b, offsets, config)
    return spec.moe_grouped_mm_swiglu(a, b, offsets)


def moe_pack_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [E, H, 2I] (gate columns, then up; the checkpoint's gate_up_proj) with its columns in the order
    moe_grouped_mm_swiglu reads (keye/ops/reference/moe_gemm.py). A copy; moe_unpack_gate_up inverts it."""
    return spec.moe_pack_gate_up(gate_up)


def moe_unpack_gate_up(packed: torch.Tensor) -> torch.Tensor:
    return spec.moe_unpack_gate_up(packed)


def moe_grouped_mm_wgrad(a: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, config: int = -1) -> torch.Tensor:
    """[E, M, N]: out[e] = a[rows of e].T @ dy[rows of e], zero for an expert without rows. Deterministic."""
    if use_kernel(a, dy, offsets):
        return torch.ops.keye.moe_grouped_mm_wgrad(a, dy, offsets, config)
    return spec.moe_grouped_mm_wgrad(a, dy, offsets)


def moe_swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(h[:, :I]) * h[:, I:] for h [R, 2I] (gate columns first, as in the checkpoint's gate_up_proj)."""
    if use_kernel(h):
        return torch.ops.keye.moe_swiglu(h)
    return spec.moe_swiglu(h)


def moe_swiglu_backward(h: torch.Tensor, d_out: torch.Tensor, a_out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of moe_swiglu at h for the output gradient d_out [R, I]: [R, 2I].

    a_out: optional [R, I] tensor that also receives moe_swiglu(h) (one pass over h for both).
    """
    if use_kernel(h, d_out, a_out):
        return torch.ops.keye.moe_swiglu_backward(h, d_out, a_out)
    return spec.moe_swiglu_backward(h, d_out, a_out)


def moe_decode_gate_up(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """a[t*K + k] = swiglu(x[t] @ w[ids[t, k]]) for a decode-size batch, straight from the router's ids [T, K] int32
    (-1 = unrouted: zero row); each routed expert's weights are read once. packed: w in moe_pack_gate_up's column
    order. Returns [T*K, I]."""
    if use_kernel(x, ids, w):
        return torch.ops.keye.moe_decode_gate_up(x, ids, w, packed)
    return spec.moe_decode_gate_up(x, ids, w, packed)


def moe_decode_down(a: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k weights[t, k] * (a[t*K + k] @ w[ids[t, k]]): the down GEMM and the weighted combine of a decode
    step (weights fp32 [T, K]; top_k * I <= 16384). Returns [T, H]."""
    if use_kernel(a, ids, weights, w):
        return torch.ops.keye.moe_decode_down(a, ids, weights, w)
    return spec.moe_decode_down(a, ids, weights, w)


def moe_decode(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor, gate_up_packed: bool = False) -> torch.Tensor:
    """The routed experts of one decode token in one kernel: out = sum_k weights[k] * (swiglu(x @ gate_up[e_k]) @
    down[e_k]), x [1, H], ids int32 / weights fp32 [1, K], fp32 from the products to the sum (the activations are not
    rounded). Each routed expert's weights are read once; deterministic. The CUDA kernel takes H a multiple of 16 up
    to 4096, I a multiple of 8 up to 2048, K <= 64 (reference.moe_gemm.decode_fused_supported). gate_up_packed:
    gate_up in moe_pack_gate_up's column order. Returns [1, H]."""
    if use_kernel(x, ids, weights, gate_up, down):
        return torch.ops.keye.moe_decode(x, ids, weights, gate_up, down, gate_up_packed)
    return spec.moe_decode(x, ids, weights, gate_up, down, gate_up_packed)


def moe_grouped_gemm_configs(kind: str) -> list[str]:
    """Names of the compiled tile configurations for 'fwd', 'dgrad', 'wgrad' or 'fwd_swiglu' (index = config id)."""
    if not kernels_available():
        return []
    return list(torch.ops.keye.moe_grouped_gemm_configs(kind))


# --- torch.library registrations (only when the extension defined the ops) -------------------------

def _register() -> None:
    lib = "keye::"

    @torch.library.register_fake(lib + "moe_grouped_mm")
    def _(a, b, offsets, trans_b=False, config=-1):
        return a.new_empty(a.shape[0], b.shape[1] if trans_b else b.shape[2])

    @torch.library.register_fake(lib + "moe_grouped_mm_wgrad")
    def _(a, dy, offsets, config=-1):
        return a.new_empty(offsets.shape[0] - 1, a.shape[1], dy.shape[1])

    @torch.library.register_fake(lib + "moe_grouped_mm_swiglu")
    def _(a, b, offsets, config=-1):
        return a.new_empty(a.shape[0], b.shape[2] // 2)

    @torch.library.register_fake(lib + "moe_swiglu")
    def _(h):
        return h.new_empty(h.shape[0], h.shape[1] // 2)

    @torch.library.register_fake(lib + "moe_swiglu_backward")
    def _(h, d_out, a_out=None):
        return torch.empty_like(h)

    @torch.library.register_fake(lib + "moe_decode_gate_up")
    def _(x, ids, w, packed=False):
        return x.new_empty(ids.numel(), w.shape[2] // 2)

    @torch.library.register_fake(lib + "moe_decode_down")
    def _(a, ids, weights, w):
        return a.new_empty(ids.shape[0], w.shape[2])

    @torch.library.register_fake(lib + "moe_decode")
    def _(x, ids, weights, gate_up, down, gate_up_packed=False):
        return x.new_empty(1, down.shape[2])

    # The references are the CPU implementations, so torch.ops.keye.* work on any device.
    torch.library.impl(lib + "moe_grouped_mm", "CPU")(
        lambda a, b, offsets, trans_b=False, config=-1: spec.moe_grouped_mm(a, b, offsets, trans_b))
    torch.library.impl(lib + "moe_grouped_mm_wgrad", "CPU")(
        lambda a, dy, offsets, config=-1: spec.moe_grouped_mm_wgrad(a, dy, offsets))
    torch.library.impl(lib + "moe_grouped_mm_swiglu", "CPU")(
        lambda a, b, offsets, config=-1: spec.moe_grouped_mm_swiglu(a, b, offsets))
    torch.library.impl(lib + "moe_swiglu", "CPU")(spec.moe_swiglu)
    torch.library.impl(lib + "moe_swiglu_backward", "CPU")(spec.moe_swiglu_backward)
    torch.library.impl(lib + "moe_decode_gate_up", "CPU")(spec.moe_decode_gate_up)
    torch.library.impl(lib + "moe_decode_down", "CPU")(spec.moe_decode_down)
    torch.library.impl(lib + "moe_decode", "CPU")(spec.moe_decode)


if kernels_available():
    _register()

__all__ = ["moe_grouped_mm", "moe_grouped_mm_wgrad", "moe_grouped_mm_swiglu", "moe_pack_gate_up",
           "moe_unpack_gate_up", "moe_swiglu", "moe_swiglu_backward", "moe_decode_gate_up",
           "moe_decode_down", "moe_decode", "moe_grouped_gemm_configs"]
