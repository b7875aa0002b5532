// Builds the block plan (block_plan.h): one CTA per block of 16 queries stages their 16 index lists in shared
// memory (as K/V rows), counts per row how many of lists 1-15 hold it (4-bit counts in shared memory, one window of
// 128K rows at a time), marks the rows of list 0 that all lists hold as common in every list, then warp q < 16
// writes query q's remaining rows in 16-row tiles that alternate with those of the other query of its pair.
//
// History (ncu, H200, 32K tokens): the first kernel (256 threads, divisions in its staging loops) was latency-bound
// at 12.5% occupancy; division-free loops took it from 2.68 to 1.74 ms. It then intersected the lists by merge walks
// (list q against list 0, two warps per walk): 0.71 ms on 1024 threads, instruction-bound (71% SM throughput) on
// the walks' dependent shared-memory steps, ~11% of the forward. Counting replaces the walks with independent work.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>

#include "common/check.h"
#include "common/ptx.cuh"
#include "sparse_attention/block_plan.h"
#include "sparse_attention/host_checks.h"
#include "sparse_attention/sparse_attention.h"

namespace keye {
namespace sparse_attention {
namespace {

constexpr int kPlanThreads = 1024;  // one warp per query in the last phase, 32 warps for the counting passes
constexpr int kCandidates = kMaxChunk / kPlanThreads;  // entries of the first list per thread
constexpr int kInCommon = 1 << 30;                    // staged entry is in the common set
// Rows per counting window: a 4-bit count per row (64 KB) and a bit per row of list 0 (16 KB). One window covers
// every list of a context up to 128K tokens; longer ranges take one window per 128K rows that list 0 reaches.
constexpr int kWindowRows = 1 << 17;
constexpr int kCountWords = kWindowRows / 8;
constexpr int kBitWords = kWindowRows / 32;

// Sort key of a staged entry: its row (mark bit ignored); empty slots (-1) sort last.
__device__ __forceinline__ unsigned key(int v) { return v < 0 ? UINT_MAX : static_cast<unsigned>(v & kRowMask); }

// First index in list[lo, hi) whose key is >= x.
__device__ __forceinline__ int lower_bound(const int* list, int lo, int hi, unsigned x) {
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (key(list[mid]) < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Calls f(i) for every slot i < K of a list, spread over the CTA so that the 32 lanes of a warp take slots about
// K / 32 apart: sorted lists hold runs of adjacent rows (the recent window), and adjacent lanes counting adjacent
// rows would hit the same 8-row count word at once (serialised shared-memory atomics). The stride is odd so the
// lanes' list entries fall in 32 different banks (with a stride of 64 every lane read the same bank: the first
// build of the counting plan took 1.14 ms at 32K, slower than the merge walks it replaced).
template <typename F>
__device__ __forceinline__ void for_each_slot(int K, F f) {
  const int stride = ((K + 31) / 32) | 1, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j = warp; j < stride; j += kPlanThreads / 32) {
    const int i = lane * stride + j;
    if (i < K) f(i);
  }
}

__global__ void __launch_bounds__(kPlanThreads) block_plan_kernel(const IndexParams ix, int* common, int* common_len,
                                                                  int* pair_work, int* pair_len) {
  extern __shared__ int lists[];  // [kBlockQueries][K] rows, -1 = empty slot
  const int K = ix.num_idx, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBlockQueries;
  const int nq = static_cast<int>(min(static_cast<int64_t>(kBlockQueries), ix.num_queries - q0));

  // Stage the raw lists with cp.async (all of a thread's loads in flight at once), then turn positions into rows.
  __shared__ int64_t base[kBlockQueries];
  if (tid < nq) base[tid] = ix.row_base ? ix.row_base[q0 + tid] : 0;
  // 16-byte copies where every list row is 16-byte aligned (K = 2048: 8 copies per thread instead of 32).
  const bool wide = K % 4 == 0 && ix.idx_stride % 4 == 0 && reinterpret_cast<uintptr_t>(ix.idx) % 16 == 0;
  for (int q = 0; q < nq; ++q) {
    const int* src = ix.idx + (q0 + q) * ix.idx_stride;
    if (wide) {
      for (int i = 4 * tid; i < K; i += 4 * kPlanThreads) cp_async16(lists + q * K + i, src + i, true);
    } else {
      for (int i = tid; i < K; i += kPlanThreads) cp_async4(lists + q * K + i, src + i, true);
    }
  }
  cp_async_wait_all();
  __syncthreads();
  for (int q = 0; q < nq; ++q) {
    for (int i = tid; i < K; i += kPlanThreads) {
      const int x = lists[q * K + i];
      const int64_t row = base[q] + static_cast<int64_t>(x);
      lists[q * K + i] = (x >= 0 && row < ix.num_rows) ? static_cast<int>(row) : -1;
    }
  }
  __syncthreads();
  bool unsorted = false;
  for (int q = 0; q < nq; ++q) {
    for (int i = tid; i + 1 < K; i += kPlanThreads) {
      const int a = lists[q * K + i], b = lists[q * K + i + 1];
      unsorted |= (a < 0 && b >= 0) || (a >= 0 && b >= 0 && b <= a);
    }
  }
  const bool sorted = !__syncthreads_or(unsorted);

  // The common set: entries of list 0 that every other list holds (lists are strictly increasing, so a row is
  // counted at most once per list). Per window of rows [w0, w0 + span): a 4-bit count per row of the lists 1 ..
  // nq - 1 (at most 15, so the counts never carry into each other) and a bit per row of list 0; an entry is common
  // when its row is in list 0 and counted nq - 1 times. Every pass is independent shared-memory work; the merge
  // walks this replaced were chains of dependent loads (0.71 ms of the 32K forward, instruction-bound).
  unsigned* counts = reinterpret_cast<unsigned*>(lists + kBlockQueries * K);
  unsigned* in_first = counts + kCountWords;
  const int n0 = sorted ? lower_bound(lists, 0, K, UINT_MAX) : 0;  // valid entries sort first
  const unsigned last = n0 > 0 ? key(lists[n0 - 1]) : 0u;
  const int* cand = lists + tid * kCandidates;
  uint32_t in_all = 0;
  for (int first = 0; first < n0;) {  // first: list 0's first entry in the window
    const unsigned w0 = key(lists[first]), span = min(static_cast<unsigned>(kWindowRows), last - w0 + 1);
    for (int w = tid; w < static_cast<int>((span + 7) / 8); w += kPlanThreads) counts[w] = 0;
    for (int w = tid; w < static_cast<int>((span + 31) / 32); w += kPlanThreads) in_first[w] = 0;
    __syncthreads();
    for (int q = 1; q < nq; ++q) {
      const int* list = lists + q * K;
      for_each_slot(K, [&](int i) {
        const unsigned r = key(list[i]) - w0;  // empty slots and rows outside the window wrap past span
        if (r < span) atomicAdd(&counts[r / 8], 1u << (4 * (r % 8)));
      });
    }
    for_each_slot(K, [&](int i) {
      const unsigned r = key(lists[i]) - w0;
      if (r < span) atomicOr(&in_first[r / 32], 1u << (r % 32));
    });
    __syncthreads();
    auto common_row = [&](unsigned r) {
      return ((counts[r / 8] >> (4 * (r % 8))) & 15u) == static_cast<unsigned>(nq - 1);
    };
#pragma unroll
    for (int c = 0; c < kCandidates; ++c) {
      if (tid * kCandidates + c >= n0) continue;
      const unsigned r = key(cand[c]) - w0;
      if (r < span && common_row(r)) in_all |= 1u << c;
    }
    for (int q = 1; q < nq; ++q) {
      int* list = lists + q * K;
      for_each_slot(K, [&](int i) {
        const unsigned r = key(list[i]) - w0;
        if (r < span && ((in_first[r / 32] >> (r % 32)) & 1u) && common_row(r)) list[i] |= kInCommon;
      });
    }
    // Next window: list 0's first entry past this one (windows without an entry of list 0 are skipped).
    first = lower_bound(lists, first, n0, w0 + span);
    __syncthreads();  // counts read before the next window clears them
  }

  // Compact the common rows (list 0 order, ascending) with a block scan of the per-thread counts.
  const int mine = __popc(in_all);
  int incl = mine;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += y;
  }
  __shared__ int warp_sums[kPlanThreads / 32];
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  int before = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kPlanThreads / 32; ++w) {
    before += w < warp ? warp_sums[w] : 0;
    total += warp_sums[w];
  }
  int at = before + incl - mine;
  int* block_common = common + static_cast<int64_t>(blockIdx.x) * K;
#pragma unroll
  for (int c = 0; c < kCandidates; ++c) {
    if (!((in_all >> c) & 1u)) continue;
    block_common[at++] = (cand[c] & kRowMask) | kSeenLo | kSeenHi;
    lists[tid * kCandidates + c] |= kInCommon;  // this thread's own entries of list 0
  }
  if (tid == 0) common_len[blockIdx.x] = total;
  __syncthreads();  // all marks visible

  // Warp w < 16 writes query w's remaining rows into its pair's list: query a's (even w) n-th row to slot
  // 32 (n / 16) + n % 16, query b's to + 16; the shorter list of the pair is padded with -1.
  static_assert(kPlanThreads / 32 >= kBlockQueries, "one warp per query in the last phase");
  __shared__ int remaining[kBlockQueries];
  const bool writer = warp < kBlockQueries;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kBlockPairs + warp / 2;
  int* out = pair_work + pair * pair_stride(K);
  const int q = warp, h = warp % 2, bit = h ? kSeenHi : kSeenLo;
  int n = 0;
  if (writer && q < nq) {
    for (int b0 = 0; b0 < K; b0 += 32) {
      const int i = b0 + lane;
      const int v = i < K ? lists[q * K + i] : -1;
      const bool keep = v >= 0 && !(v & kInCommon);
      const unsigned mask = __ballot_sync(0xffffffffu, keep);
      const int pos = n + __popc(mask & ((1u << lane) - 1u));
      if (keep) out[32 * (pos / 16) + 16 * h + pos % 16] = (v & kRowMask) | bit;
      n += __popc(mask);
    }
  }
  if (writer && lane == 0) remaining[warp] = n;
  __syncthreads();
  if (!writer) return;
  const int slots = 16 * ((max(remaining[warp & ~1], remaining[warp | 1]) + 15) / 16);
  for (int pos = n + lane; pos < slots; pos += 32) out[32 * (pos / 16) + 16 * h + pos % 16] = -1;
  if (h == 0 && lane == 0) pair_len[pair] = 2 * slots;
}

}  // namespace

at::Tensor build_block_plan(const IndexParams& ix, const at::Tensor& like, cudaStream_t stream, BlockPlan& plan) {
  const int64_t blocks = (ix.num_queries + kBlockQueries - 1) / kBlockQueries;
  const int64_t K = ix.num_idx, pairs = blocks * kBlockPairs, stride = pair_stride(ix.num_idx);
  KEYE_CHECK(K >= 1 && K <= kMaxChunk, "keye.sparse_attention: the block plan takes 1 to ", kMaxChunk,
             " index slots per query, got ", K);
  at::Tensor buf = at::empty({blocks * K + blocks + pairs * stride + pairs}, like.options().dtype(at::kInt));
  int* common = buf.data_ptr<int>();
  int* common_len = common + blocks * K;
  int* pair_work = common_len + blocks;
  int* pair_len = pair_work + pairs * stride;
  plan = BlockPlan{common, common_len, pair_work, pair_len, static_cast<int>(K)};
  if (blocks == 0) return buf;
  const int smem = static_cast<int>((kBlockQueries * K + kCountWords + kBitWords) * sizeof(int));
  C10_CUDA_CHECK(cudaFuncSetAttribute(block_plan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  block_plan_kernel<<<static_cast<unsigned>(blocks), kPlanThreads, smem, stream>>>(ix, common, common_len, pair_work,
                                                                                   pair_len);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return buf;
}

}  // namespace sparse_attention

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_attention_block_plan_cuda(
    const at::Tensor& indices, const std::optional<at::Tensor>& row_base, int64_t num_rows) {
  using namespace sparse_attention;
  const char* op = "sparse_attention_block_plan";
  check_cuda(indices, op, "indices");
  check_dtype(indices, {at::kInt}, op, "indices");
  check_dim(indices, 2, op, "indices", "[N, K]");
  check_row_major_rows(indices, op, "indices");
  const int64_t N = indices.size(0), K = indices.size(1);
  KEYE_CHECK(K >= 1 && K <= kMaxChunk, "keye.", op, ": 'indices' must have 1 to ", kMaxChunk,
             " slots per query, got ", K);
  KEYE_CHECK(N < (int64_t{1} << 31), "keye.", op, ": at most 2^31 - 1 queries, got ", N);
  KEYE_CHECK(num_rows >= 0 && num_rows <= kRowMask, "keye.", op, ": 'num_rows' must be in [0, 2^29 - 1], got ",
             num_rows);
  IndexParams ix{};
  ix.row_base = checked_row_base(row_base, indices, "indices", "the query count (indices.size(0))", op);
  ix.idx = indices.data_ptr<int>();
  ix.idx_stride = indices.stride(0);
  ix.num_idx = static_cast<int>(K);
  ix.num_rows = num_rows;
  ix.num_queries = N;  // pair and chunk: not read by the plan
  const at::cuda::CUDAGuard guard(indices.device());
  BlockPlan plan{};
  const at::Tensor buf = build_block_plan(ix, indices, at::cuda::getCurrentCUDAStream(), plan);
  const int64_t blocks = (N + kBlockQueries - 1) / kBlockQueries, pairs = blocks * kBlockPairs;
  const int64_t stride = pair_stride(static_cast<int>(K));
  int64_t at0 = 0;
  auto take = [&](std::initializer_list<int64_t> shape, int64_t n) {
    at::Tensor t = buf.narrow(0, at0, n).view(shape);
    at0 += n;
    return t;
  };
  at::Tensor common = take({blocks, K}, blocks * K);
  at::Tensor common_len = take({blocks}, blocks);
  at::Tensor pair_work = take({pairs, stride}, pairs * stride);
  at::Tensor pair_len = take({pairs}, pairs);
  return {common, common_len, pair_work, pair_len};
}

}  // namespace keye
