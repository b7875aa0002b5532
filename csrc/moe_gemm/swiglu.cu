// SwiGLU between the two expert GEMMs: a = silu(gate) * up with gate = h[:, :I], up = h[:, I:] (Qwen3's
// act_fn(gate_proj(x)) * up_proj(x)), and its backward. Bandwidth-bound: 16-byte vectors, fp32 math.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <algorithm>

#include "common/check.h"
#include "moe_gemm/grouped_gemm.h"

namespace keye {
namespace {

constexpr int kVec = 8;  // bf16 per 16-byte access

struct Vec8 {
  float v[kVec];
};

__device__ __forceinline__ Vec8 load8(const __nv_bfloat16* p) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  Vec8 r;
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    r.v[2 * i] = f.x;
    r.v[2 * i + 1] = f.y;
  }
  return r;
}

__device__ __forceinline__ void store8(__nv_bfloat16* p, const Vec8& x) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) h[i] = __floats2bfloat162_rn(x.v[2 * i], x.v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Calls f(row, column) for every 8-column vector of an [rows, inter] output, grid-stride.
template <class F>
__device__ __forceinline__ void for_each_vector(int64_t rows, int64_t inter, F f) {
  const int64_t vecs_per_row = inter / kVec;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * vecs_per_row;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    f(i / vecs_per_row, (i % vecs_per_row) * kVec);
}

__global__ void swiglu_kernel(const __nv_bfloat16* __restrict__ h, __nv_bfloat16* __restrict__ out, int64_t rows,
                              int64_t inter) {
  for_each_vector(rows, inter, [&](int64_t r, int64_t c) {
    const Vec8 g = load8(h + r * 2 * inter + c);
    const Vec8 u = load8(h + r * 2 * inter + inter + c);
    Vec8 a;
#pragma unroll
    for (int j = 0; j < kVec; ++j) a.v[j] = g.v[j] * sigmoid(g.v[j]) * u.v[j];
    store8(out + r * inter + c, a);
  });
}

// d gate = d * up * s * (1 + gate * (1 - s)), d up = d * gate * s, with s = sigmoid(gate); optionally also the
// forward silu(gate) * up (a_out): the backward of the MoE layer needs it for the down projection's weight gradient,
// and writing it here saves re-reading h in a separate forward pass.
__global__ void swiglu_backward_kernel(const __nv_bfloat16* __restrict__ h, const __nv_bfloat16* __restrict__ d_out,
                                       __nv_bfloat16* __restrict__ dh, __nv_bfloat16* __restrict__ a_out,
                                       int64_t rows, int64_t inter) {
  for_each_vector(rows, inter, [&](int64_t r, int64_t c) {
    const Vec8 g = load8(h + r * 2 * inter + c);
    const Vec8 u = load8(h + r * 2 * inter + inter + c);
    const Vec8 d = load8(d_out + r * inter + c);
    Vec8 dg, du, a;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float s = sigmoid(g.v[j]);
      dg.v[j] = d.v[j] * u.v[j] * s * (1.0f + g.v[j] * (1.0f - s));
      du.v[j] = d.v[j] * g.v[j] * s;
      a.v[j] = g.v[j] * s * u.v[j];
    }
    store8(dh + r * 2 * inter + c, dg);
    store8(dh + r * 2 * inter + inter + c, du);
    if (a_out != nullptr) store8(a_out + r * inter + c, a);
  });
}

void check_gate_up(const at::Tensor& h, const char* op) {
  check_cuda(h, op, "h");
  check_dtype(h, {at::kBFloat16}, op, "h");
  check_dim(h, 2, op, "h", "[R, 2I] (gate columns, then up columns)");
  check_contiguous(h, op, "h");
  KEYE_CHECK(h.size(1) % 16 == 0, "keye.", op, ": argument 'h' must have 2I columns with I a multiple of 8, got ",
             "shape ", dims_str(h.sizes()));
}

unsigned blocks_for(int64_t work) {
  return static_cast<unsigned>(std::clamp<int64_t>((work + 255) / 256, 1, 132 * 16));
}

}  // namespace

at::Tensor moe_swiglu_cuda(const at::Tensor& h) {
  const char* op = "moe_swiglu";
  check_gate_up(h, op);
  const int64_t R = h.size(0), I = h.size(1) / 2;
  at::Tensor out = at::empty({R, I}, h.options());
  if (R * I == 0) return out;
  const c10::cuda::CUDAGuard guard(h.device());
  swiglu_kernel<<<blocks_for(R * I / kVec), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const __nv_bfloat16*>(h.data_ptr()), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), R, I);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor moe_swiglu_backward_cuda(const at::Tensor& h, const at::Tensor& d_out,
                                    const std::optional<at::Tensor>& a_out) {
  const char* op = "moe_swiglu_backward";
  check_gate_up(h, op);
  const int64_t R = h.size(0), I = h.size(1) / 2;
  auto check_rows_by_inter = [&](const at::Tensor& t, const char* name) {
    check_cuda(t, op, name);
    check_same_device(t, h, op, name, "h");
    check_dtype(t, {at::kBFloat16}, op, name);
    check_dim(t, 2, op, name, "[R, I]");
    check_contiguous(t, op, name);
    check_size(t, 0, R, op, name, "the rows of h");
    check_size(t, 1, I, op, name, "I (h.size(1) / 2)");
  };
  check_rows_by_inter(d_out, "d_out");
  const bool want_a = a_out.has_value() && a_out->defined();
  if (want_a) check_rows_by_inter(*a_out, "a_out");
  at::Tensor dh = at::empty_like(h);
  if (R * I == 0) return dh;
  const c10::cuda::CUDAGuard guard(h.device());
  swiglu_backward_kernel<<<blocks_for(R * I / kVec), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const __nv_bfloat16*>(h.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(d_out.data_ptr()),
      reinterpret_cast<__nv_bfloat16*>(dh.data_ptr()),
      want_a ? reinterpret_cast<__nv_bfloat16*>(a_out->data_ptr()) : nullptr, R, I);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dh;
}

}  // namespace keye
