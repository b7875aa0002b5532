// Builds the block plan (block_plan.h): one CTA per block of 16 queries stages their 16 index lists in shared
// memory (as K/V rows), intersects them (warps 2q and 2q + 1 merge list q with list 0 and count the matches per
// entry of list 0), marks the common rows in every list, then warp q < 16 writes query q's remaining rows in 16-row
// tiles that alternate with those of the other query of its pair.
//
// ncu (H200, 32K tokens, 256 threads then): 12.5% occupancy (the 128 KB of staged lists allow one CTA per SM),
// 0.27 issued instructions per scheduler, stalls mostly on fixed-latency dependencies: a third or more of the
// instructions were the integer divisions of the staging loops (entry -> query, slot). Hence division-free loops
// (query outer, slot inner) and 16 warps instead of 8 (4 candidates of the first list per thread).
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

constexpr int kPlanThreads = 1024;  // two warps per list in the merge walks; one per query in the last phase
constexpr int kWalkLanes = 2 * 32;   // lanes that share one list's merge walk
constexpr int kCandidates = kMaxChunk / kPlanThreads;  // entries of the first list per thread
constexpr int kInCommon = 1 << 30;                    // staged entry is in the common set

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

// Walks this lane's share of the merge of two sorted lists a[0, na) and b[0, nb) (valid rows only) and calls
// on_match(i, j) for every a[i] == b[j]. The merge takes a[i] before b[j] when a[i] <= b[j], so equal entries are
// adjacent in it and the match is seen where a[i] is taken, whichever lane's share b[j] falls in. Lane l (of
// kWalkLanes) walks merge positions [2 m l, 2 m (l + 1)) with m odd and 2 m kWalkLanes > n = na + nb: about 65
// dependent steps for two full lists (130 with one warp per list), where a binary search per entry of a costs ~11
// per entry and list. Why 2 m: for similar lists lane l starts near entry m l of both, and with m odd a warp's 32
// shared-memory loads fall in 32 different banks (with equal shares of n / 32 = 128 every lane hit the same bank:
// measured 1.74 -> 1.60 ms only).
template <typename OnMatch>
__device__ __forceinline__ void merge_walk(const int* a, int na, const int* b, int nb, int lane, OnMatch on_match) {
  const int n = na + nb, m = ((n + 2 * kWalkLanes - 1) / (2 * kWalkLanes) + 1) | 1;
  const int d0 = min(n, 2 * m * lane), d1 = min(n, 2 * m * (lane + 1));
  // Merge-path split at diagonal d0: the number of a's entries among the first d0 merged ones.
  int lo = max(0, d0 - nb), hi = min(d0, na);
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (key(a[mid]) <= key(b[d0 - mid - 1])) lo = mid + 1;
    else hi = mid;
  }
  int i = lo, j = d0 - lo;
  unsigned av = i < na ? key(a[i]) : UINT_MAX, bv = j < nb ? key(b[j]) : UINT_MAX;
  // Branch-free steps (one shared load each): with a branch per list the lanes of a warp that advance in a and those
  // that advance in b ran one after the other.
  for (int d = d0; d < d1; ++d) {
    // Within the merge both lists cannot be exhausted, so the UINT_MAX sentinels never compare equal here.
    if (av == bv) on_match(i, j);
    const bool take_a = av <= bv;
    i += take_a;
    j += !take_a;
    const int next = take_a ? i : j;
    const unsigned v = next < (take_a ? na : nb) ? key((take_a ? a : b)[next]) : UINT_MAX;
    av = take_a ? v : av;
    bv = take_a ? bv : v;
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

  // The common set: entries of list 0 that every other list holds. Warps 2q and 2q + 1 (1 <= q < nq) merge list q
  // with list 0 and count the matches per entry of list 0 (lists are strictly increasing, so at most one per list);
  // entries counted nq - 1 times are common. A second walk marks them in list q.
  __shared__ int hits[kMaxChunk];
  for (int i = tid; i < K; i += kPlanThreads) hits[i] = 0;
  __syncthreads();
  const int n0 = sorted ? lower_bound(lists, 0, K, UINT_MAX) : 0;  // valid entries sort first
  const int walk_list = warp / 2, walk_lane = (warp % 2) * 32 + lane;
  int* list_q = lists + walk_list * K;
  const int nq_valid = sorted && walk_list >= 1 && walk_list < nq ? lower_bound(list_q, 0, K, UINT_MAX) : 0;
  if (nq_valid > 0)
    merge_walk(lists, n0, list_q, nq_valid, walk_lane, [&](int i, int) { atomicAdd(&hits[i], 1); });
  __syncthreads();  // every count is in
  const int* cand = lists + tid * kCandidates;
  uint32_t in_all = 0;
#pragma unroll
  for (int c = 0; c < kCandidates; ++c)
    if (tid * kCandidates + c < n0 && hits[tid * kCandidates + c] == nq - 1) in_all |= 1u << c;
  if (__syncthreads_or(in_all != 0) && nq_valid > 0) {  // no second walk when nothing is common
    merge_walk(lists, n0, list_q, nq_valid, walk_lane, [&](int i, int j) {
      if (hits[i] == nq - 1) list_q[j] |= kInCommon;
    });
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
  const int smem = static_cast<int>(kBlockQueries * K * sizeof(int));
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
