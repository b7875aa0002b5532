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

// The gate_up GEMM with SwiGLU in its epilogue: out[r] = silu(g) * u of a[r] @ b[e] (fp32, rounded once), b
// [E, K, 2I] in moe_pack_gate_up's column order (swiglu_epilogue.cuh), out [R, I]; rows at or past offsets[E] zero.
at::Tensor moe_grouped_mm_swiglu_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
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

// Decode-size expert GEMMs straight from the router's output (ids [T, K] int32, -1 = unrouted), streaming
// each routed expert's weights once (decode_gemv.cu):
// gate_up: a[t*K + k] = swiglu(x[t] @ w[ids[t, k]]), w [E, H, 2I] -> [T*K, I] (zero rows for unrouted slots); packed:
// w in moe_pack_gate_up's column order (packed_gate_up.cuh);
at::Tensor moe_decode_gate_up_cuda(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& w, bool packed);
// down + combine: out[t] = sum_k weights[t, k] * (a[t*K + k] @ w[ids[t, k]]), w [E, I, H], weights fp32 -> [T, H].
at::Tensor moe_decode_down_cuda(const at::Tensor& a, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w);
// Both and the combine for one token in one kernel (decode_fused.cu): x [1, H], ids/weights [1, K], gate_up
// [E, H, 2I], down [E, I, H] -> out [1, H] = sum_k weights[k] * (swiglu(x @ gate_up[e_k]) @ down[e_k]), fp32 throughout;
// gate_up_packed as moe_decode_gate_up's packed.
at::Tensor moe_decode_cuda(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                           const at::Tensor& gate_up, const at::Tensor& down, bool gate_up_packed);

}  // namespace keye
