// MoE router, one warp per token:
//   each lane holds experts lane, lane+32, ... (NV = ceil(E/32) registers); softmax in fp32 with warp
//   reductions; top-k on the logits (ties -> lower expert index, NaN as -inf), so selection never depends on
//   rounding of the exponentials: every lane sorts its NV (logit, expert) keys once, then K rounds of a
//   warp-wide max over the lanes' best keys, the winning lane popping its key; weights renormalised over the K.
//   (v1 did a full candidate scan and a (value, index) argmax every round: instruction-bound, see NOTES.md.)
// Load-balancing statistics without atomics to global memory (deterministic, no contention):
//   each warp sums its tokens' probabilities in registers in token order, the block adds its warps in warp
//   order into a [blocks, E] partial (counts likewise, from a shared-memory histogram), and a second
//   kernel adds the blocks in order.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <cfloat>
#include <climits>
#include <cstdint>

#include "common/check.h"
#include "common/cutlass_types.h"
#include "moe_router/moe_router.h"

namespace keye {
namespace {

constexpr int kWarps = 8;
constexpr int kTokensPerWarp = 4;  // 32 tokens a block: 128 blocks (about one per SM) at 4K tokens
constexpr int kTokensPerBlock = kWarps * kTokensPerWarp;
constexpr int kMaxExperts = 512;
constexpr int kMaxTopK = 32;
constexpr int kReduceThreads = 1024;

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

// Sort key of (logit, expert): float bits made unsigned-order-preserving in the high word, ~expert in the low
// word, so unsigned comparison orders by logit and then by lower expert index. 0 is below every real key.
__device__ __forceinline__ uint64_t make_key(float v, int expert) {
  const uint32_t u = __float_as_uint(v == 0.f ? 0.f : v);  // -0.0 ties with +0.0, as in the reference
  const uint32_t hi = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(hi) << 32) | static_cast<uint32_t>(~expert);
}
__device__ __forceinline__ int key_expert(uint64_t k) { return static_cast<int>(~static_cast<uint32_t>(k)); }
__device__ __forceinline__ float key_logit(uint64_t k) {
  const uint32_t hi = static_cast<uint32_t>(k >> 32);
  return __uint_as_float((hi & 0x80000000u) ? (hi & 0x7fffffffu) : ~hi);
}

// Descending bubble sort with compile-time indices (registers only).
template <int NV>
__device__ __forceinline__ void sort_desc(uint64_t (&k)[NV]) {
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j + 1 < NV - i; ++j)
      if (k[j] < k[j + 1]) {
        const uint64_t t = k[j];
        k[j] = k[j + 1];
        k[j + 1] = t;
      }
}

template <typename T, int NV>
__global__ void __launch_bounds__(kWarps * 32) router_kernel(
    const T* __restrict__ logits, int64_t row_stride, int num_tokens, int num_experts, int top_k, bool renormalize,
    float* __restrict__ weights, int* __restrict__ ids, float* __restrict__ partial_probs,
    int* __restrict__ partial_counts) {
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
    uint64_t key[NV];  // (order-preserving logit bits, ~expert): larger key = larger logit, then lower index
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int e = lane + 32 * j;
      p[j] = e < num_experts ? __expf(x[j] - m) : 0.f;
      s += p[j];
      key[j] = e < num_experts ? make_key(isnan(x[j]) ? -INFINITY : x[j], e) : 0;  // NaN ranks as -inf
    }
    const float inv = 1.f / warp_sum(s);
#pragma unroll
    for (int j = 0; j < NV; ++j) acc[j] += p[j] * inv;
    sort_desc<NV>(key);

    // Top-k: K rounds of a warp-wide max over each lane's best remaining key; the winning lane pops it.
    int my_id = 0;
    float my_p = 0.f;
    for (int r = 0; r < top_k; ++r) {
      uint64_t best = key[0];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const uint64_t other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
      }
      if (key[0] == best) {
#pragma unroll
        for (int j = 0; j + 1 < NV; ++j) key[j] = key[j + 1];
        key[NV - 1] = 0;
      }
      if (lane == r) {  // lane r keeps the r-th choice
        my_id = key_expert(best);
        my_p = __expf(key_logit(best) - m) * inv;
      }
    }
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
    partial_probs[static_cast<int64_t>(blockIdx.x) * num_experts + e] = s;
    partial_counts[static_cast<int64_t>(blockIdx.x) * num_experts + e] = hist[e];
  }
}

// prob_sum[e], counts[e] = sums over blocks of the partials. A block covers 32 experts (coalesced rows);
// its 32 warps take every 32nd block row and are added in warp order: a fixed summation order.
__global__ void __launch_bounds__(kReduceThreads) reduce_partials_kernel(
    const float* __restrict__ partial_probs, const int* __restrict__ partial_counts, int num_blocks,
    int num_experts, float* __restrict__ prob_sum, int* __restrict__ counts) {
  constexpr int kRows = kReduceThreads / 32;
  __shared__ float ps[kRows][32];
  __shared__ int cs[kRows][32];
  const int c = threadIdx.x % 32, r = threadIdx.x / 32;
  const int e = blockIdx.x * 32 + c;
  float p = 0.f;
  int n = 0;
  if (e < num_experts) {
    for (int b = r; b < num_blocks; b += kRows) {
      p += partial_probs[static_cast<int64_t>(b) * num_experts + e];
      n += partial_counts[static_cast<int64_t>(b) * num_experts + e];
    }
  }
  ps[r][c] = p;
  cs[r][c] = n;
  __syncthreads();
  if (r == 0 && e < num_experts) {
    for (int rr = 1; rr < kRows; ++rr) {
      p += ps[rr][c];
      n += cs[rr][c];
    }
    prob_sum[e] = p;
    counts[e] = n;
  }
}

template <typename T, int NV>
void launch(const at::Tensor& logits, int64_t row_stride, int T_, int E, int K, bool renorm, at::Tensor& weights,
            at::Tensor& ids, at::Tensor& partial_probs, at::Tensor& partial_counts, cudaStream_t stream) {
  const int blocks = (T_ + kTokensPerBlock - 1) / kTokensPerBlock;
  router_kernel<T, NV><<<blocks, kWarps * 32, 0, stream>>>(
      reinterpret_cast<const T*>(logits.data_ptr()), row_stride, T_, E, K, renorm, weights.data_ptr<float>(),
      ids.data_ptr<int>(), partial_probs.data_ptr<float>(), partial_counts.data_ptr<int>());
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
  at::Tensor counts = at::empty({E}, logits.options().dtype(at::kInt));
  at::Tensor prob_sum = at::empty({E}, f32);
  const int blocks = static_cast<int>((T + kTokensPerBlock - 1) / kTokensPerBlock);
  at::Tensor partial_probs = at::empty({std::max(blocks, 1), E}, f32);
  at::Tensor partial_counts = at::empty({std::max(blocks, 1), E}, logits.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t row_stride = T > 1 ? logits.stride(0) : E;
  if (T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_router", [&] {
      using T_ = typename CutlassType<scalar_t>::type;
      auto go = [&](auto nv) {  // nv: experts per lane, a compile-time constant
        launch<T_, decltype(nv)::value>(logits, row_stride, static_cast<int>(T), static_cast<int>(E),
                                        static_cast<int>(top_k), renormalize, weights, ids, partial_probs,
                                        partial_counts, stream);
      };
      if (E <= 32) go(std::integral_constant<int, 1>{});
      else if (E <= 64) go(std::integral_constant<int, 2>{});
      else if (E <= 128) go(std::integral_constant<int, 4>{});
      else if (E <= 256) go(std::integral_constant<int, 8>{});
      else go(std::integral_constant<int, 16>{});
    });
  }
  reduce_partials_kernel<<<(E + 31) / 32, kReduceThreads, 0, stream>>>(
      partial_probs.data_ptr<float>(), partial_counts.data_ptr<int>(), T > 0 ? blocks : 0, static_cast<int>(E),
      prob_sum.data_ptr<float>(), counts.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, ids, counts, prob_sum};
}

}  // namespace keye
