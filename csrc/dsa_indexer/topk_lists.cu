// Exact top-k of decode rows from the candidate lists the streaming score kernel wrote (indexer_logits_decode.cu,
// list_candidates): one 512-thread CTA per row.
//
// Unit u of a row (one score-kernel CTA: keys_per_unit consecutive keys) listed every one of its keys whose order key
// reaches its bound b_u, in column order. Let U be the union of the lists and L the topk-th largest key of U
// (list_threshold). U is part of the row, so the row has at least topk keys >= L: the row's selection lies in the
// keys >= L. A unit with b_u <= L listed all of those; only the units with b_u > L (more of the row's top keys than
// their rank m, see decode_list_rank) or with an overflowing list may miss some. Without such units the selection
// on U is the row's. Otherwise the row's keys >= L are gathered unit by unit (the lists' keys >= L, and the missing
// units' keys re-read from the scores), still in column order, and selected from (one more list_threshold). So the
// result is exact whatever the bounds are; they only decide how much is read. Rows whose lists are too long for
// shared memory, or shorter than topk, take the whole-row path (select_whole_row). Output in ascending column
// order, ties to the lower column, as every other path (topk_select.cuh).
#include <c10/cuda/CUDAException.h>

#include "dsa_indexer/indexer_logits_decode.h"
#include "dsa_indexer/topk_lists.h"
#include "dsa_indexer/topk_select.cuh"

namespace keye {
namespace {

constexpr int kMaxUnits = kThreads;  // units per row: one per thread in the scans
constexpr int kRowListCap = 8192;    // entries of each of the two lists in shared memory

struct ListSmem {
  uint32_t keys[2][kRowListCap];
  int cols[2][kRowListCap];
  int off[2][kMaxUnits];  // each unit's first entry in list 0 / list 1
  int len[2][kMaxUnits];  // and its entry count
  uint32_t lo;            // the least bound of the units (every listed key reaches it)
};

// Appends the keys >= L of src[begin, end) (a unit's listed entries in column order) to dst at `at`, in order, by
// one warp; returns the largest appended key.
__device__ uint32_t copy_reaching(const uint32_t* keys, const int* cols, int begin, int end, uint32_t L,
                                  uint32_t* dkeys, int* dcols, int at, int lane) {
  uint32_t kmax = 0;
  for (int i0 = begin; i0 < end; i0 += 32) {
    const int i = i0 + lane;
    const uint32_t k = i < end ? keys[i] : 0u;
    const bool take = i < end && k >= L;
    const uint32_t ballot = __ballot_sync(0xffffffffu, take);
    if (take) {
      const int pos = at + __popc(ballot & ((1u << lane) - 1u));
      dkeys[pos] = k;
      dcols[pos] = cols[i];
      kmax = max(kmax, k);
    }
    at += __popc(ballot);
  }
  return kmax;
}

// The same for the scores of columns [begin, end) of a row in global memory.
__device__ uint32_t scan_reaching(const float* row, int begin, int end, uint32_t L, uint32_t* dkeys, int* dcols,
                                  int at, int lane) {
  uint32_t kmax = 0;
  for (int c0 = begin; c0 < end; c0 += 32) {
    const int c = c0 + lane;
    const uint32_t k = c < end ? order_key(row[c]) : 0u;
    const bool take = c < end && k >= L;
    const uint32_t ballot = __ballot_sync(0xffffffffu, take);
    if (take) {
      const int pos = at + __popc(ballot & ((1u << lane) - 1u));
      dkeys[pos] = k;
      dcols[pos] = c;
      kmax = max(kmax, k);
    }
    at += __popc(ballot);
  }
  return kmax;
}

__device__ int count_reaching(const float* row, int begin, int end, uint32_t L, int lane) {
  int c = 0;
  for (int i = begin + lane; i < end; i += 32) c += order_key(row[i]) >= L;
  return c;
}

__global__ void __launch_bounds__(kThreads, 1) topk_lists_kernel(const ListRows a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
  ListSmem& ls = *reinterpret_cast<ListSmem*>(smem_raw + ((sizeof(Shared) + 15) / 16) * 16);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t r = blockIdx.x;
  const float* row = a.scores + r * a.ld;
  int* out_idx = a.indices + r * a.topk;
  float* out_sc = a.out_scores ? a.out_scores + r * a.topk : nullptr;
  const int64_t len = static_cast<int64_t>(a.seq_lens[r / a.rows_per_seq]) - (a.rows_per_seq - 1 - r % a.rows_per_seq);
  const int n = static_cast<int>(len < 0 ? 0 : len > a.cols ? a.cols : len);
  if (n <= a.topk) return emit_all(row, n, a.topk, out_idx, out_sc, 0);
  const int nu = (n + a.keys_per_unit - 1) / a.keys_per_unit;
  if (nu > kMaxUnits) return select_whole_row(row, n, a.topk, sh, out_idx, out_sc, 0);

  // The units' counts and bounds; list 0 = the complete lists in unit order.
  const int64_t u0 = r * a.units;
  const int count = tid < nu ? a.cand_count[u0 + tid] : 0;
  const uint32_t bound = tid < nu ? a.cand_bound[u0 + tid] : ~0u;
  const bool overflow = count > kDecodeListCap;
  const int listed = overflow ? 0 : count;
  if (tid == 0) ls.lo = ~0u, sh.list_max = 0;
  int m;
  const int off = block_exclusive_scan(listed, sh, &m);  // its barriers publish the initial values above
  if (m > kRowListCap || m < a.topk) return select_whole_row(row, n, a.topk, sh, out_idx, out_sc, 0);
  if (tid < nu) {
    ls.off[0][tid] = off;
    ls.len[0][tid] = listed;
    if (!overflow) atomicMin(&ls.lo, bound);
  }
  __syncthreads();
  // A warp per unit, kUnitsAhead units at a time with the first 64 entries of each in flight together (one loop of
  // dependent round trips per unit took ~10 us per row at 137-256 units; entries spread over the threads by a
  // binary search, uncoalesced, 6.5 us: H200 stamps, twenty-eighth session); a rare longer list loops on.
  constexpr int kUnitsAhead = 8;
  uint32_t kmax = 0;
  for (int u1 = warp * kUnitsAhead; u1 < nu; u1 += kWarps * kUnitsAhead) {
    uint2 e[kUnitsAhead][2];
#pragma unroll
    for (int k = 0; k < kUnitsAhead; ++k) {
      const int u = u1 + k, c = u < nu ? ls.len[0][u] : 0;
      const uint2* src = a.cand + (u0 + u) * kDecodeListCap;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (lane + 32 * h < c) e[k][h] = src[lane + 32 * h];
    }
#pragma unroll
    for (int k = 0; k < kUnitsAhead; ++k) {
      const int u = u1 + k;
      if (u >= nu) break;
      const int o = ls.off[0][u], c = ls.len[0][u];
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (lane + 32 * h < c) {
          ls.keys[0][o + lane + 32 * h] = e[k][h].x;
          ls.cols[0][o + lane + 32 * h] = static_cast<int>(e[k][h].y);
          kmax = max(kmax, e[k][h].x);
        }
      const uint2* src = a.cand + (u0 + u) * kDecodeListCap;
      for (int i = 64 + lane; i < c; i += 32) {
        const uint2 x = src[i];
        ls.keys[0][o + i] = x.x;
        ls.cols[0][o + i] = static_cast<int>(x.y);
        kmax = max(kmax, x.x);
      }
    }
  }
  kmax = __reduce_max_sync(0xffffffffu, kmax);
  if (lane == 0) atomicMax(&sh.list_max, kmax);
  __syncthreads();
  Threshold th;
  th.need = a.topk;
  list_threshold(ls.keys[0], m, ls.lo, sh.list_max, th, sh);
  const uint32_t L = th.prefix;  // the topk-th largest key of the lists (or a lower bin edge when th.done)
  const bool missing = tid < nu && (overflow || bound > L);
  if (!__syncthreads_or(missing)) return emit_ordered(ls.keys[0], ls.cols[0], m, th, sh, out_idx, out_sc, 0);

  // Some units may miss keys >= L: list 1 = every key >= L of the row, unit by unit (warp per unit).
  if (tid < nu) ls.len[1][tid] = missing ? -1 : 0;  // -1: re-read from the scores
  __syncthreads();
  for (int u = warp; u < nu; u += kWarps) {
    int c;
    if (ls.len[1][u] < 0) {
      const int begin = u * a.keys_per_unit, end = min(n, begin + a.keys_per_unit);
      c = count_reaching(row, begin, end, L, lane);
    } else {
      const int begin = ls.off[0][u], end = begin + ls.len[0][u];
      c = 0;
      for (int i = begin + lane; i < end; i += 32) c += ls.keys[0][i] >= L;
    }
    c = __reduce_add_sync(0xffffffffu, c);
    __syncwarp();
    if (lane == 0) ls.len[1][u] = ls.len[1][u] < 0 ? -1 - c : c;  // keep the re-read mark: -1 - count
  }
  __syncthreads();
  const int c1 = tid < nu ? (ls.len[1][tid] < 0 ? -1 - ls.len[1][tid] : ls.len[1][tid]) : 0;
  int m1;
  const int off1 = block_exclusive_scan(c1, sh, &m1);
  if (m1 > kRowListCap) return select_whole_row(row, n, a.topk, sh, out_idx, out_sc, 0);
  if (tid < nu) ls.off[1][tid] = off1;
  __syncthreads();
  kmax = 0;
  for (int u = warp; u < nu; u += kWarps) {
    const int at = ls.off[1][u];
    if (ls.len[1][u] < 0) {
      const int begin = u * a.keys_per_unit, end = min(n, begin + a.keys_per_unit);
      kmax = max(kmax, scan_reaching(row, begin, end, L, ls.keys[1], ls.cols[1], at, lane));
    } else {
      const int begin = ls.off[0][u];
      kmax = max(kmax, copy_reaching(ls.keys[0], ls.cols[0], begin, begin + ls.len[0][u], L, ls.keys[1], ls.cols[1],
                                     at, lane));
    }
  }
  kmax = __reduce_max_sync(0xffffffffu, kmax);
  if (lane == 0) atomicMax(&sh.list_max, kmax);
  __syncthreads();
  Threshold th1;
  th1.need = a.topk;
  list_threshold(ls.keys[1], m1, L, sh.list_max, th1, sh);
  emit_ordered(ls.keys[1], ls.cols[1], m1, th1, sh, out_idx, out_sc, 0);
}

}  // namespace

void launch_topk_lists(const ListRows& a, int64_t rows, cudaStream_t stream) {
  const size_t smem = ((sizeof(Shared) + 15) / 16) * 16 + sizeof(ListSmem);
  C10_CUDA_CHECK(cudaFuncSetAttribute(topk_lists_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  topk_lists_kernel<<<static_cast<unsigned>(rows), kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace keye
