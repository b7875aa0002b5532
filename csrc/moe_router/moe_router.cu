// MoE router, one warp per token:
//   each lane holds experts lane, lane+32, ... (NV = ceil(E/32) registers); softmax in fp32 with warp
//   reductions; top-k by K rounds of a warp-wide argmax on the logits (ties -> lower expert index, NaN as
//   -inf), so selection never depends on rounding of the exponentials; weights renormalised over the K.
// Load-balancing statistics without float atomics (deterministic):
//   counts:   integer atomics (order-independent);
//   prob_sum: each warp sums its tokens' probabilities in registers in token order, the block adds its
//             warps in warp order into a [blocks, E] partial, and a second kernel adds blocks in order.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <cfloat>
#include <climits>

#include "common/check.h"
#include "moe_router/moe_router.h"

namespace keye {
namespace {

constexpr int kWarps = 8;
constexpr int kTokensPerWarp = 8;
constexpr int kTokensPerBlock = kWarps * kTokensPerWarp;
constexpr int kMaxExperts = 512;
constexpr int kMaxTopK = 32;
constexpr int kReduceThreads = 256;

template <typename T> struct CutlassType { using type = T; };
template <> struct CutlassType<at::Half> { using type = cutlass::half_t; };
template <> struct CutlassType<at::BFloat16> { using type = cutlass::bfloat16_t; };

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Larger value wins; on equal values the lower index wins. Every lane ends with the warp's winner.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

template <typename T, int NV>
__global__ void __launch_bounds__(kWarps * 32) router_kernel(
    const T* __restrict__ logits, int64_t row_stride, int num_tokens, int num_experts, int top_k, bool renormalize,
    float* __restrict__ weights, int* __restrict__ ids, int* __restrict__ counts, float* __restrict__ partial) {
  __shared__ int hist[kMaxExperts];
  __shared__ float warp_prob[kWarps][NV * 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();

  cutlass::NumericConverter<float, T> to_f;
  float acc[NV];
#pragma unroll
  for (int j = 0; j < NV; ++j) acc[j] = 0.f;

  for (int i = 0; i < kTokensPerWarp; ++i) {
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + i * kWarps + warp;
    if (t >= num_tokens) break;  // uniform per warp
    const T* row = logits + t * row_stride;
    float x[NV];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int e = lane + 32 * j;
      x[j] = e < num_experts ? to_f(row[e]) : -INFINITY;
    }
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < NV; ++j) m = fmaxf(m, x[j]);
    m = warp_max(m);
    float p[NV], s = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      p[j] = lane + 32 * j < num_experts ? expf(x[j] - m) : 0.f;
      s += p[j];
    }
    const float inv = 1.f / warp_sum(s);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      p[j] *= inv;
      acc[j] += p[j];
      if (isnan(x[j])) x[j] = -INFINITY;  // NaN ranks as -inf in the selection
    }

    // Top-k: K rounds of warp argmax over the not-yet-taken experts.
    unsigned taken = 0;  // bit j: expert lane + 32*j taken
    int my_id = 0;
    float my_p = 0.f;
    for (int r = 0; r < top_k; ++r) {
      float bv = -INFINITY;
      int bi = INT_MAX;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int e = lane + 32 * j;
        if (e < num_experts && !(taken >> j & 1u) && (x[j] > bv || (x[j] == bv && e < bi))) {
          bv = x[j];
          bi = e;
        }
      }
      warp_argmax(bv, bi);
      if ((bi & 31) == lane) {
        const int j = bi >> 5;
        taken |= 1u << j;
#pragma unroll
        for (int jj = 0; jj < NV; ++jj)
          if (jj == j) my_p = p[jj];  // register arrays only take constant indices
      }
      // lane r keeps the r-th choice
      const float pr = __shfl_sync(0xffffffffu, my_p, bi & 31);
      if (lane == r) {
        my_id = bi;
        my_p = pr;
      }
      __syncwarp();
    }
    // (my_p on lanes >= top_k may hold a winner's p from the loop; mask it out of the sum.)
    const float sel = lane < top_k ? my_p : 0.f;
    const float denom = renormalize ? warp_sum(sel) : 1.f;
    if (lane < top_k) {
      weights[t * top_k + lane] = sel / denom;
      ids[t * top_k + lane] = my_id;
      atomicAdd(&hist[my_id], 1);
    }
  }

  // Block partial of prob sums: warps in order.
#pragma unroll
  for (int j = 0; j < NV; ++j) warp_prob[warp][lane + 32 * j] = acc[j];
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += warp_prob[w][e];
    partial[static_cast<int64_t>(blockIdx.x) * num_experts + e] = s;
    if (hist[e]) atomicAdd(&counts[e], hist[e]);
  }
}

// prob_sum[e] = sum over blocks of partial[b][e]; cub's block reduction has a fixed order.
__global__ void __launch_bounds__(kReduceThreads) reduce_partials_kernel(const float* __restrict__ partial,
                                                                         int num_blocks, int num_experts,
                                                                         float* __restrict__ prob_sum) {
  using Reduce = cub::BlockReduce<float, kReduceThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const int e = blockIdx.x;
  float s = 0.f;
  for (int b = threadIdx.x; b < num_blocks; b += kReduceThreads) s += partial[static_cast<int64_t>(b) * num_experts + e];
  const float total = Reduce(storage).Sum(s);
  if (threadIdx.x == 0) prob_sum[e] = total;
}

template <typename T, int NV>
void launch(const at::Tensor& logits, int64_t row_stride, int T_, int E, int K, bool renorm, at::Tensor& weights,
            at::Tensor& ids, at::Tensor& counts, at::Tensor& partial, cudaStream_t stream) {
  const int blocks = (T_ + kTokensPerBlock - 1) / kTokensPerBlock;
  router_kernel<T, NV><<<blocks, kWarps * 32, 0, stream>>>(
      reinterpret_cast<const T*>(logits.data_ptr()), row_stride, T_, E, K, renorm, weights.data_ptr<float>(),
      ids.data_ptr<int>(), counts.data_ptr<int>(), partial.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_router_cuda(const at::Tensor& logits, int64_t top_k,
                                                                           bool renormalize) {
  const char* op = "moe_router";
  check_cuda(logits, op, "logits");
  check_dtype(logits, {at::kBFloat16, at::kHalf, at::kFloat}, op, "logits");
  check_dim(logits, 2, op, "logits", "[num_tokens, num_experts]");
  check_row_major_rows(logits, op, "logits");
  const int64_t T = logits.size(0), E = logits.size(1);
  KEYE_CHECK(E >= 1 && E <= kMaxExperts, "keye.moe_router: num_experts (logits.size(1)) must be in [1, ",
             kMaxExperts, "], got ", E);
  KEYE_CHECK(top_k >= 1 && top_k <= std::min<int64_t>(E, kMaxTopK), "keye.moe_router: argument 'top_k' must be an int in [1, ",
             std::min<int64_t>(E, kMaxTopK), "], got ", top_k);
  KEYE_CHECK(T < (int64_t(1) << 31) / top_k, "keye.moe_router: too many tokens (", T, ")");

  c10::cuda::CUDAGuard guard(logits.device());
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor weights = at::empty({T, top_k}, f32);
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  at::Tensor counts = at::zeros({E}, logits.options().dtype(at::kInt));
  at::Tensor prob_sum = at::empty({E}, f32);
  const int blocks = static_cast<int>((T + kTokensPerBlock - 1) / kTokensPerBlock);
  at::Tensor partial = at::empty({std::max(blocks, 1), E}, f32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t row_stride = T > 1 ? logits.stride(0) : E;
  if (T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_router", [&] {
      using T_ = typename CutlassType<scalar_t>::type;
      const int t = static_cast<int>(T), e = static_cast<int>(E), k = static_cast<int>(top_k);
      if (E <= 32) launch<T_, 1>(logits, row_stride, t, e, k, renormalize, weights, ids, counts, partial, stream);
      else if (E <= 64) launch<T_, 2>(logits, row_stride, t, e, k, renormalize, weights, ids, counts, partial, stream);
      else if (E <= 128) launch<T_, 4>(logits, row_stride, t, e, k, renormalize, weights, ids, counts, partial, stream);
      else if (E <= 256) launch<T_, 8>(logits, row_stride, t, e, k, renormalize, weights, ids, counts, partial, stream);
      else launch<T_, 16>(logits, row_stride, t, e, k, renormalize, weights, ids, counts, partial, stream);
    });
  }
  reduce_partials_kernel<<<E, kReduceThreads, 0, stream>>>(partial.data_ptr<float>(), T > 0 ? blocks : 0,
                                                            static_cast<int>(E), prob_sum.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, ids, counts, prob_sum};
}

}  // namespace keye
