// Builds the block plan (block_plan.h): one CTA per block of 16 queries stages their 16 index lists in shared
// memory (as K/V rows), intersects them (a merge walk per list from each thread's 8 candidates of the first list),
// marks the common rows in every list, then each warp writes its query's remaining rows, interleaved by 8 with
// the other query of its pair.
//
// ncu (H200, 32K tokens, 256 threads then): 12.5% occupancy (the 128 KB of staged lists allow one CTA per SM),
// 0.27 issued instructions per scheduler, stalls mostly on fixed-latency dependencies: a third or more of the
// instructions were the integer divisions of the staging loops (entry -> query, slot). Hence division-free loops
// (query outer, slot inner) and 16 warps instead of 8 (4 candidates of the first list per thread).
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <climits>

#include "common/check.h"
#include "common/ptx.cuh"
#include "sparse_attention/block_plan.h"

namespace keye {
namespace sparse_attention {
namespace {

constexpr int kPlanThreads = 512;  // one warp per query of the block in the last phase
constexpr int kCandidates = kMaxChunk / kPlanThreads;  // entries of the first list per thread
constexpr int kInCommon = 1 << 30;                    // staged entry is in the common set

// Sort key of a staged entry: its row (mark bit ignored); empty slots (-1) sort last.
__device__ __forceinline__ unsigned key(int v) { return v < 0 ? UINT_MAX : static_cast<unsigned>(v & kRowMask); }

__device__ __forceinline__ int lower_bound(const int* list, int lo, int hi, unsigned x) {
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (key(list[mid]) < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Which of this thread's candidates (bits of `want`; ascending rows cand[0..]) the sorted list holds; with mark,
// also sets kInCommon on the matching entries. A binary search for the first, then a short walk per candidate.
__device__ uint32_t find_in_list(int* list, int count, const int* cand, uint32_t want, bool mark) {
  uint32_t found = 0;
  int j = -1;
#pragma unroll
  for (int c = 0; c < kCandidates; ++c) {
    if (!((want >> c) & 1u)) continue;
    const unsigned x = key(cand[c]);
    if (j < 0) {
      j = lower_bound(list, 0, count, x);
    } else {
      for (int step = 0; step < 4 && j < count && key(list[j]) < x; ++step) ++j;
      if (j < count && key(list[j]) < x) j = lower_bound(list, j, count, x);
    }
    if (j < count && key(list[j]) == x) {
      found |= 1u << c;
      if (mark) list[j] |= kInCommon;
    }
  }
  return found;
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
  for (int q = 0; q < nq; ++q)
    for (int i = tid; i < K; i += kPlanThreads) cp_async4(lists + q * K + i, ix.idx + (q0 + q) * ix.idx_stride + i, true);
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

  // The common set: candidates of list 0 found in every other list; then mark them in every list.
  const int* cand = lists + tid * kCandidates;
  uint32_t in_all = 0;
  if (sorted) {
#pragma unroll
    for (int c = 0; c < kCandidates; ++c)
      if (tid * kCandidates + c < K && cand[c] >= 0) in_all |= 1u << c;
    for (int q = 1; q < nq && in_all; ++q) in_all &= find_in_list(lists + q * K, K, cand, in_all, false);
  }
  __syncthreads();  // every walk over unmarked lists is done
  if (in_all) {
    for (int q = 1; q < nq; ++q) find_in_list(lists + q * K, K, cand, in_all, true);
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

  // Warp w writes query w's remaining rows into its pair's list: query a's (even w) n-th row to slot
  // 16 (n / 8) + n % 8, query b's to + 8; the shorter list of the pair is padded with -1.
  __shared__ int remaining[kBlockQueries];
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kBlockPairs + warp / 2;
  int* out = pair_work + pair * pair_stride(K);
  const int q = warp, h = warp % 2, bit = h ? kSeenHi : kSeenLo;
  int n = 0;
  if (q < nq) {
    for (int b0 = 0; b0 < K; b0 += 32) {
      const int i = b0 + lane;
      const int v = i < K ? lists[q * K + i] : -1;
      const bool keep = v >= 0 && !(v & kInCommon);
      const unsigned mask = __ballot_sync(0xffffffffu, keep);
      const int pos = n + __popc(mask & ((1u << lane) - 1u));
      if (keep) out[16 * (pos / 8) + 8 * h + pos % 8] = (v & kRowMask) | bit;
      n += __popc(mask);
    }
  }
  if (lane == 0) remaining[warp] = n;
  __syncthreads();
  const int slots = 8 * ((max(remaining[warp & ~1], remaining[warp | 1]) + 7) / 8);
  for (int pos = n + lane; pos < slots; pos += 32) out[16 * (pos / 8) + 8 * h + pos % 8] = -1;
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
  const int smem = static_cast<int>(kBlockQueries * K * sizeof(int));
  C10_CUDA_CHECK(cudaFuncSetAttribute(block_plan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  block_plan_kernel<<<static_cast<unsigned>(blocks), kPlanThreads, smem, stream>>>(ix, common, common_len, pair_work,
                                                                                   pair_len);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return buf;
}

}  // namespace sparse_attention
}  // namespace keye
