// MoE token permutation: routing metadata, scatter into expert order, weighted combine back.
// The semantics are specified by keye/ops/reference/moe_permute.py; these are the CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace keye {

// topk_ids [T, K] (int32/int64, -1 = slot not routed) -> dest [T, K] int32, src [N] int32, offsets [E+1] int32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& topk_ids, int64_t num_experts,
                                                              int64_t align);

// out[dest[t, k]] = scale[t, k] * x[t]; rows that no (t, k) targets (src == -1) are zero.
at::Tensor moe_permute_cuda(const at::Tensor& x, const at::Tensor& dest, const at::Tensor& src,
                            const std::optional<at::Tensor>& scale);

// out[t] = sum_k weights[t, k] * y[dest[t, k]] (fp32 accumulation, k in order; dest == -1 adds nothing).
at::Tensor moe_unpermute_cuda(const at::Tensor& y, const at::Tensor& dest, const std::optional<at::Tensor>& weights);

// out[t, k] = <rows[dest[t, k]], tokens[t]> in fp32 (0 where dest == -1): the gradient of a per-slot factor.
at::Tensor moe_slot_dot_cuda(const at::Tensor& rows, const at::Tensor& dest, const at::Tensor& tokens);

}  // namespace keye
