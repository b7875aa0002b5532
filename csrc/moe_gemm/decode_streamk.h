// Stream-K decode down GEMV (decode_streamk.cu): equal contiguous shares of the routed experts' down weight rows per
// CTA. Arguments are checked by the caller (moe_decode_down_cuda).
#pragma once

#include <ATen/ATen.h>

namespace keye {

// out [T, H] = sum_k weights[t, k] * (a[t*K + k] @ w[ids[t, k]]). Returns false, launching nothing, where the
// column-block kernel of decode_gemv.cu is the better one (fewer 64-column tiles than SMs) or the layout does not fit.
bool decode_down_streamk(const at::Tensor& a, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w,
                         at::Tensor& out);

}  // namespace keye
