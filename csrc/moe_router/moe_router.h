// MoE router: softmax over experts, top-k, optional renormalisation, per-expert counts and
// probability sums. Semantics: keye/ops/reference/moe_router.py.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace keye {

// logits [T, E] -> weights [T, K] fp32, ids [T, K] int32, counts [E] int32, prob_sum [E] fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_router_cuda(const at::Tensor& logits, int64_t top_k,
                                                                           bool renormalize);

}  // namespace keye
