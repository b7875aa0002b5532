// Fused Hadamard rotation + FP8 (e4m3, ue8m0 scale per row) quantisation of indexer queries and keys.
// One warp per row of D values (D/32 per lane, blocked). The butterfly runs in the reference's order (strides
// 1, 2, 4, ... with a+b / a-b) in fp32, so the rotated values, scales and fp8 bytes match it bit for bit.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp8.h>

#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "dsa_indexer/dsa_checks.h"
#include "dsa_indexer/dsa_indexer.h"

namespace keye {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T, int D>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    rotate_quantize_kernel(const T* __restrict__ x, int64_t rows, float norm, uint8_t* __restrict__ x8,
                           float* __restrict__ scale) {
  constexpr int V = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  float v[V];
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = static_cast<float>(x[row * D + lane * V + j]);
#pragma unroll
  for (int h = 1; h < V; h <<= 1)
#pragma unroll
    for (int j = 0; j < V; ++j)
      if ((j & h) == 0) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
#pragma unroll
  for (int h = V; h < D; h <<= 1) {
    const int lane_bit = h / V;
    const bool upper = lane & lane_bit;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float other = __shfl_xor_sync(0xffffffffu, v[j], lane_bit);
      v[j] = upper ? other - v[j] : v[j] + other;
    }
  }
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    v[j] *= norm;
    amax = fmaxf(amax, fabsf(v[j]));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  // 2^ceil(log2(max(amax, 1e-4) / 448)), exactly: keep a power of two, else the next one up.
  const uint32_t bits = __float_as_uint(__fdiv_rn(fmaxf(amax, 1e-4f), 448.f));
  const float s = __uint_as_float((bits & 0x007fffffu) ? (bits & 0x7f800000u) + 0x00800000u : bits);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float q = fminf(fmaxf(v[j] / s, -448.f), 448.f);
    x8[row * D + lane * V + j] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3));
  }
  if (lane == 0) scale[row] = s;
}

template <typename T>
void launch_rotate(const at::Tensor& x, int64_t rows, int64_t D, at::Tensor& x8, at::Tensor& scale) {
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  uint8_t* op = reinterpret_cast<uint8_t*>(x8.data_ptr());
  float* sp = scale.data_ptr<float>();
  switch (D) {
    case 32: rotate_quantize_kernel<T, 32><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(xp, rows, norm, op, sp); break;
    case 64: rotate_quantize_kernel<T, 64><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(xp, rows, norm, op, sp); break;
    default: rotate_quantize_kernel<T, 128><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(xp, rows, norm, op, sp); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> indexer_rotate_quantize_cuda(const at::Tensor& x) {
  const char* op = "indexer_rotate_quantize";
  check_cuda(x, op, "x");
  check_dtype(x, {at::kBFloat16, at::kHalf, at::kFloat}, op, "x");
  KEYE_CHECK(x.dim() >= 1, "keye.", op, ": argument 'x' must be at least 1-D [..., D_I], got shape ",
             dims_str(x.sizes()));
  const int64_t D = x.size(-1);
  KEYE_CHECK(indexer_dim_ok(D), "keye.", op, ": D_I (x.size(-1)) must be one of (32, 64, 128), got ", D);
  check_contiguous(x, op, "x");
  auto x8 = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  auto scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const int64_t rows = x.numel() / D;
  if (rows == 0) return {x8, scale};
  const at::cuda::CUDAGuard guard(x.device());
  switch (x.scalar_type()) {
    case at::kBFloat16: launch_rotate<__nv_bfloat16>(x, rows, D, x8, scale); break;
    case at::kHalf: launch_rotate<__half>(x, rows, D, x8, scale); break;
    default: launch_rotate<float>(x, rows, D, x8, scale); break;
  }
  return {x8, scale};
}

}  // namespace keye
