"""Norm ops of the language model: the row RMSNorm, its residual-add form, per-head RMSNorm + RoPE, and the
indexer key's LayerNorm + RoPE.

    y = keye.ops.rms_norm(x, weight, eps)                      # x [..., D]
    y, s = keye.ops.add_rms_norm(x, residual, weight, eps)     # s = x + residual, y = rms_norm(s)
    q = keye.ops.rms_norm_rope(q, q_norm_weight, cos, sin, eps)  # q [T, H, D], cos / sin [T, D] fp32
    k = keye.ops.layer_norm_rope(k, ln_weight, ln_bias, cos, sin, eps)  # k [T, H, D] -> fp32

Semantics: keye/ops/reference/norm.py (the rounding steps of Qwen3's modules). The CUDA kernels take x in bf16,
fp16 or fp32 with the weight (and bias) in x's dtype (the RoPE ops: D in 32 / 64 / 128 / 256); other
combinations, CPU tensors and keye.ops.force_reference() run the reference. Gradients (both paths) come from the
reference, recomputed in the backward: the kernels save nothing but their inputs.
"""

from __future__ import annotations

import torch

from keye._extension import kernels_available
from keye.ops import reference as ref
from keye.ops._dispatch import use_kernel

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ROPE_DIMS = (32, 64, 128, 256)


def _check_weight(op: str, x: torch.Tensor, weight: torch.Tensor, name: str = "weight") -> None:
    if x.dim() < 1:
        raise ValueError(f"keye.{op}: argument 'x' must have at least one dim, got a scalar")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"keye.{op}: argument '{name}' must be [D] with D = x's last dim {x.shape[-1]}, got "
                         f"shape {list(weight.shape)}")


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor) -> bool:
    return (use_kernel(x, weight, *others) and x.dtype in _KERNEL_DTYPES and weight.dtype == x.dtype
            and all(o.dtype == x.dtype for o in others))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """weight * rmsnorm(x) over x's last dim, in x's dtype (Qwen3's RMSNorm)."""
    _check_weight("rms_norm", x, weight)
    if _kernel_ok(x, weight):
        return torch.ops.keye.rms_norm(x, weight, float(eps))
    return ref.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x's dtype first (a residual add and a norm)."""
    _check_weight("add_rms_norm", x, weight)
    if residual.shape != x.shape:
        raise ValueError(f"keye.add_rms_norm: argument 'residual' must have x's shape {list(x.shape)}, got "
                         f"{list(residual.shape)}")
    if _kernel_ok(x, weight, residual):
        return tuple(torch.ops.keye.add_rms_norm(x, residual, weight, float(eps)))
    return ref.add_rms_norm(x, residual, weight, eps)


def _check_rope_args(op: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"keye.{op}: argument 'x' must be 3-D [T, H, D], got shape {list(x.shape)}")
    T, _, D = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (T, D):
            raise ValueError(f"keye.{op}: argument '{name}' must be [T, D] = [{T}, {D}], got shape {list(t.shape)}")


def _rope_kernel_ok(x, weight, cos, sin, *others) -> bool:
    return (_kernel_ok(x, weight, *others) and x.shape[-1] in _ROPE_DIMS and cos.dtype == sin.dtype == torch.float32
            and use_kernel(cos, sin))


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
                  ) -> torch.Tensor:
    """Per-head RMSNorm, then rotate-half RoPE: x [T, H, D], weight [D], cos / sin [T, D] -> [T, H, D]."""
    _check_weight("rms_norm_rope", x, weight)
    _check_rope_args("rms_norm_rope", x, cos, sin)
    if _rope_kernel_ok(x, weight, cos, sin):
        return torch.ops.keye.rms_norm_rope(x, weight, cos, sin, float(eps))
    return ref.rms_norm_rope(x, weight, cos, sin, eps)


def layer_norm_rope(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm of x.float() then RoPE, in fp32: x [T, H, D], weight / bias [D], cos / sin [T, D] -> fp32."""
    _check_weight("layer_norm_rope", x, weight)
    _check_weight("layer_norm_rope", x, bias, "bias")
    _check_rope_args("layer_norm_rope", x, cos, sin)
    if _rope_kernel_ok(x, weight, cos, sin, bias):
        return torch.ops.keye.layer_norm_rope(x, weight, bias, cos, sin, float(eps))
    return ref.layer_norm_rope(x, weight, bias, cos, sin, eps)


# ---- autograd: the reference recomputed in the backward --------------------------------------------------------

def _save_inputs(ctx, inputs, output):
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    ctx.eps = inputs[-1]
    ctx.save_for_backward(*tensors)


def _reference_grads(fn, ctx, grads):
    """Gradients of fn(*saved tensors, eps) for the given output gradients (None: no gradient to that output)."""
    saved = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(need) for t, need in zip(saved, ctx.needs_input_grad)]
        outputs = fn(*inputs, ctx.eps)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        wanted = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                   if pairs and wanted else [None] * len(wanted))
    return tuple(next(got) if t.requires_grad else None for t in inputs) + (None,)


def _register() -> None:
    lib = "keye::"

    @torch.library.register_fake(lib + "rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "add_rms_norm")
    def _(x, residual, weight, eps):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(x, memory_format=torch.contiguous_format))

    @torch.library.register_fake(lib + "rms_norm_rope")
    def _(x, weight, cos, sin, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "layer_norm_rope")
    def _(x, weight, bias, cos, sin, eps):
        return torch.empty_like(x, dtype=torch.float32, memory_format=torch.contiguous_format)

    for name in ("rms_norm", "add_rms_norm", "rms_norm_rope", "layer_norm_rope"):
        fn = getattr(ref, name)
        torch.library.impl(lib + name, "CPU")(fn)
        torch.library.register_autograd(lib + name, lambda ctx, *g, fn=fn: _reference_grads(fn, ctx, g),
                                        setup_context=_save_inputs)


if kernels_available():
    _register()

__all__ = ["rms_norm", "add_rms_norm", "rms_norm_rope", "layer_norm_rope"]
