// Builds the block plan (block_plan.h): one CTA per block of 16 queries stages their 16 index lists in shared
// memory (as K/V rows), counts per row how many of lists 1-15 hold it (4-bit counts in shared memory, one window of
// 128K rows at a time), marks the rows of list 0 that all lists hold as common in every list, then warp q < 16
// writes query q's remaining rows in 16-row tiles that alternate with those of the other query of its pair.
//
// History (ncu, H200, 32K tokens): the first kernel (256 threads, divisions in its staging loops) was latency-bound
// at 12.5% occupancy; division-free loops took it from 2.68 to 1.74 ms. It then intersected the lists by merge walks
// (list q against list 0, two warps per walk): 0.71 ms on 1024 threads, instruction-bound (71% SM throughput) on
// the walks' dependent shared-memory steps, ~11% of the forward. Counting replaced the walks with independent work
// (0.60 ms), and unrolling every per-list loop over the 16 lists cut its 204 K warp instructions per block to 109 K
// (0.38 ms; NOTES.md, seventeenth session).
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

// The two slots of every list this thread takes in the counting passes (valid[c] false where there is none).
// Lane l takes slots of its own segment [l seg, (l + 1) seg) of the list, seg = ceil(K / 32), so the lanes of a
// warp hold rows far apart: sorted lists hold runs of adjacent rows (the recent window), and adjacent lanes
// counting adjacent rows would hit the same 8-row count word at once (serialised shared-memory atomics). Within the
// segment the slot is rotated by the lane, (j + l) % seg, so with seg a multiple of 32 (K = 2048: seg = 64) the
// lanes' 32 loads fall in 32 different banks (with seg = 64 and no rotation every lane read the same bank: that
// build took 1.14 ms at 32K).
struct CountSlots {
  int slot[2];
  bool valid[2];
};
template <bool kFull>  // kFull: K = kMaxChunk, every slot valid
__device__ __forceinline__ CountSlots count_slots(int K) {
  const int seg = (K + 31) / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  static_assert(kMaxChunk <= 2 * 32 * (kPlanThreads / 32), "two slots per thread and list cover a list");
  CountSlots s;
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int j = warp + 32 * c;
    s.slot[c] = lane * seg + (j + lane) % seg;
    s.valid[c] = kFull || (j < seg && s.slot[c] < K);
  }
  return s;
}

// Calls f(q, slot) for this thread's count slots of lists q_first .. nq - 1 (unrolled over the lists).
template <typename F>
__device__ __forceinline__ void for_each_counted(const CountSlots& counted, int q_first, int nq, F f) {
#pragma unroll
  for (int q = q_first; q < kBlockQueries; ++q) {
    if (q >= nq) break;
#pragma unroll
    for (int c = 0; c < 2; ++c)
      if (counted.valid[c]) f(q, counted.slot[c]);
  }
}

// kK: the slot count when it is kMaxChunk (the Keye shape; every per-list offset is then a compile-time constant and
// no slot needs a range check), else 0 (K from ix.num_idx).
template <int kK>
__global__ void __launch_bounds__(kPlanThreads) block_plan_kernel(const IndexParams ix, int* common, int* common_len,
                                                                  int* pair_work, int* pair_len) {
  static_assert(kK == 0 || kK == kMaxChunk, "kK: 0 or kMaxChunk");
  extern __shared__ __align__(16) int lists[];  // [kBlockQueries][K] rows, -1 = empty slot
  const int K = kK ? kK : ix.num_idx, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBlockQueries;
  const int nq = static_cast<int>(min(static_cast<int64_t>(kBlockQueries), ix.num_queries - q0));

  // Stage the raw lists with cp.async (all of a thread's loads in flight at once), then turn positions into rows.
  // Every per-list loop below is unrolled over the 16 lists with a fixed number of slots per thread (K <= 2048 =
  // 2 x 1024): with a loop per list of two iterations the loop and address overhead was most of the kernel's
  // instructions (ncu: 204 K warp instructions per block, issue-bound).
  // 16-byte copies where every list row is 16-byte aligned.
  const bool wide = K % 4 == 0 && ix.idx_stride % 4 == 0 && reinterpret_cast<uintptr_t>(ix.idx) % 16 == 0;
  if (kK != 0 && wide) {
    // The block's 16 x 512 pieces of 16 bytes, 8 per thread: piece tid + 1024 m is piece tid % 512 of list
    // 2 m + tid / 512.
    constexpr int kPieces = kMaxChunk / 4;
    const int piece = tid % kPieces;
#pragma unroll
    for (int m = 0; m < kBlockQueries * kPieces / kPlanThreads; ++m) {
      const int q = m * (kPlanThreads / kPieces) + tid / kPieces;
      if (q < nq) cp_async16(lists + q * kMaxChunk + 4 * piece, ix.idx + (q0 + q) * ix.idx_stride + 4 * piece, true);
    }
  } else {
    const int* src = ix.idx + q0 * ix.idx_stride;
#pragma unroll
    for (int q = 0; q < kBlockQueries; ++q, src += ix.idx_stride) {
      if (q >= nq) break;
      if (wide) {
        if (4 * tid < K) cp_async16(lists + q * K + 4 * tid, src + 4 * tid, true);
      } else {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int i = tid + c * kPlanThreads;
          if (i < K) cp_async4(lists + q * K + i, src + i, true);
        }
      }
    }
  }
  // A valid slot x (x >= 0, base + x < num_rows) becomes row base + x (< 2^29), any other -1. The row test is one
  // unsigned compare against the list's limit num_rows - base, clamped to [0, 2^32 - 1].
  __shared__ unsigned limit[kBlockQueries];
  __shared__ int base[kBlockQueries];
  if (tid < nq) {
    const int b0 = ix.row_base ? ix.row_base[q0 + tid] : 0;
    base[tid] = b0;
    limit[tid] = static_cast<unsigned>(min(max(ix.num_rows - b0, int64_t{0}), int64_t{UINT_MAX}));
  }
  cp_async_wait_all();
  __syncthreads();
  // Rows and sortedness in one pass: thread t converts slots 2t and 2t + 1 of every list and checks them against
  // their successors (slot 2t + 2 is converted here too); the rows are written back after the CTA-wide vote, when
  // every thread has read the raw slots it needs.
  static_assert(kMaxChunk == 2 * kPlanThreads && kCandidates == 2, "thread t owns slots 2t and 2t + 1");
  const int i0 = 2 * tid;
  int rows[kBlockQueries][2];
  bool unsorted = false;
#pragma unroll
  for (int q = 0; q < kBlockQueries; ++q) {
    if (q >= nq) break;
    const int b0 = base[q];
    const unsigned lim = limit[q];
    auto row_of = [&](int x) { return x >= 0 && static_cast<unsigned>(x) < lim ? b0 + x : -1; };
    auto out_of_order = [](int a, int b) { return (a < 0 && b >= 0) || (a >= 0 && b >= 0 && b <= a); };
    const int* list = lists + q * K;
    rows[q][0] = i0 < K ? row_of(list[i0]) : -1;
    rows[q][1] = i0 + 1 < K ? row_of(list[i0 + 1]) : -1;
    const int next = i0 + 2 < K ? row_of(list[i0 + 2]) : -1;
    if (i0 + 1 < K) unsorted |= out_of_order(rows[q][0], rows[q][1]);
    if (i0 + 2 < K) unsorted |= out_of_order(rows[q][1], next);
  }
  const bool sorted = !__syncthreads_or(unsorted);
#pragma unroll
  for (int q = 0; q < kBlockQueries; ++q) {
    if (q >= nq) break;
    if (i0 < K) lists[q * K + i0] = rows[q][0];
    if (i0 + 1 < K) lists[q * K + i0 + 1] = rows[q][1];
  }
  __syncthreads();

  // The common set: entries of list 0 that every other list holds (lists are strictly increasing, so a row is
  // counted at most once per list). Per window of rows [w0, w0 + span): a 4-bit count per row of the lists 1 ..
  // nq - 1 (at most 15, so the counts never carry into each other) and a bit per row of list 0; an entry is common
  // when its row is in list 0 and counted nq - 1 times. Every pass is independent shared-memory work; the merge
  // walks this replaced were chains of dependent loads (0.71 ms of the 32K forward, instruction-bound).
  unsigned* counts = reinterpret_cast<unsigned*>(lists + kBlockQueries * K);
  unsigned* in_first = counts + kCountWords;
  const int n0 = sorted ? lower_bound(lists, 0, K, UINT_MAX) : 0;  // valid entries sort first
  const unsigned last = n0 > 0 ? key(lists[n0 - 1]) : 0u;
  const int cand[kCandidates] = {rows[0][0], rows[0][1]};  // this thread's slots of list 0
  const CountSlots counted = count_slots<kK != 0>(K);
  __shared__ unsigned dummy[32];
  uint32_t in_all = 0;
  for (int first = 0; first < n0;) {  // first: list 0's first entry in the window
    const unsigned w0 = key(lists[first]), span = min(static_cast<unsigned>(kWindowRows), last - w0 + 1);
    for (int w = tid; w < static_cast<int>((span + 7) / 8); w += kPlanThreads) counts[w] = 0;
    for (int w = tid; w < static_cast<int>((span + 31) / 32); w += kPlanThreads) in_first[w] = 0;
    __syncthreads();
    for_each_counted(counted, 0, nq, [&](int q, int slot) {
      const unsigned r = key(lists[q * K + slot]) - w0;  // empty slots, rows outside: past span
      // Rows outside the window add nothing to a dummy word of this lane: no branch around the atomic.
      const bool in = r < span;
      if (q == 0) atomicOr(in ? &in_first[r / 32] : &dummy[lane], in ? 1u << (r % 32) : 0u);
      else atomicAdd(in ? &counts[r / 8] : &dummy[lane], in ? 1u << (4 * (r % 8)) : 0u);
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
    for_each_counted(counted, 1, nq, [&](int q, int slot) {
      int* e = lists + q * K + slot;
      const int v = *e;
      const unsigned r = key(v) - w0, rc = r < span ? r : 0u;  // rc: a row inside the window to read
      // Bitwise &: both words are read unconditionally, one predicated store instead of three branches.
      if ((r < span) & ((in_first[rc / 32] >> (rc % 32)) & 1u) & common_row(rc)) *e = v | kInCommon;
    });
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
#pragma unroll 4
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
  auto kernel = K == kMaxChunk ? block_plan_kernel<kMaxChunk> : block_plan_kernel<0>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<static_cast<unsigned>(blocks), kPlanThreads, smem, stream>>>(ix, common, common_len, pair_work, pair_len);
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
