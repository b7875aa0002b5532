// Grouped GEMMs of an MoE layer, grouped by expert over rows that moe_route put in expert order.
// The semantics are specified by keye/ops/reference/moe_gemm.py; these are the CUDA kernels.
//
// offsets [E+1] int32 (device): expert e owns rows [offsets[e], offsets[e+1]). Nothing about the groups is
// read on the host, so every op here is CUDA-graph capturable.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace keye {

// out[r] = a[r] @ b[e] (b [E, K, N], trans_b = false) or a[r] @ b[e]^T (b [E, N, K], trans_b = true) for the
// rows r of expert e; rows at or past offsets[E] are zero. bf16 in and out, fp32 accumulation.
// config: -1 picks by problem size; otherwise an index into grouped_gemm_configs() (for benchmarks).
at::Tensor moe_grouped_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, bool trans_b,
                               int64_t config);

// dw[e] = a[rows of e]^T @ dy[rows of e]: [E, K, N] from a [R, K] and dy [R, N]; zero for experts with no rows.
// Deterministic: every output tile is one CTA's sum over its expert's rows in order (no split, no atomics).
at::Tensor moe_grouped_mm_wgrad_cuda(const at::Tensor& a, const at::Tensor& dy, const at::Tensor& offsets,
                                     int64_t config);

// The tile configurations compiled in, by index: "<schedule> <M>x<N>x<K> cluster <m>x<n>", per kind
// ("fwd", "dgrad", "wgrad").
std::vector<std::string> moe_grouped_gemm_configs(const std::string& kind);

// SwiGLU on gate_up rows: out[r, j] = silu(h[r, j]) * h[r, I + j], h [R, 2I] -> [R, I] (fp32 math).
at::Tensor moe_swiglu_cuda(const at::Tensor& h);
// Its backward: dh [R, 2I] from h and d_out [R, I].
at::Tensor moe_swiglu_backward_cuda(const at::Tensor& h, const at::Tensor& d_out,
                                    const std::optional<at::Tensor>& a_out);

// Decode-size expert GEMMs that stream each routed expert's weights once (T <= a few hundred slots).
// gate_up: out[r] = swiglu(x[src[r] / K] @ w[e]) for the rows r of expert e, w [E, H, 2I] -> [R, I];
// rows with src == -1 and rows at or past offsets[E] are zero.
at::Tensor moe_decode_gate_up_cuda(const at::Tensor& x, const at::Tensor& src, int64_t top_k, const at::Tensor& offsets,
                                   const at::Tensor& w);
// down: out[r] = a[r] @ w[e], w [E, I, H] -> [R, H]; rows at or past offsets[E] are zero.
at::Tensor moe_decode_down_cuda(const at::Tensor& a, const at::Tensor& offsets, const at::Tensor& w);

}  // namespace keye
