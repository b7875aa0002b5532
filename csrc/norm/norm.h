// Norm kernels of the language model: the row RMSNorm (with an optional residual add in front), the per-head
// q / k RMSNorm followed by rotate-half RoPE, and the indexer key's LayerNorm followed by RoPE.
// Semantics: keye/ops/reference/norm.py.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace keye {

// x [..., D] -> weight * round(x * rsqrt(mean(x^2) + eps)), in x's dtype (weight must share it).
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps);

// (rms_norm(x + residual), x + residual): the sum rounded to x's dtype before it is normalised.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps);

// x [T, H, D] -> rope(rms_norm(x)) with cos / sin [T, D] fp32 (rotate-half pairs j, j + D/2); D in {32, 64, 128,
// 256}. Output contiguous [T, H, D] in x's dtype.
at::Tensor rms_norm_rope_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos,
                              const at::Tensor& sin, double eps);

// x [T, H, D] -> rope(layer_norm(x.float(), weight, bias)) in fp32 (the DSA indexer's key path); weight and bias
// [D] in x's dtype, D in {32, 64, 128, 256}. Output contiguous fp32 [T, H, D].
at::Tensor layer_norm_rope_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& cos, const at::Tensor& sin, double eps);

}  // namespace keye
