// Exact top-k of rows whose score kernel also wrote group maxima (decode): one 512-thread CTA per row, the search
// bounded by the maxima. The radix select it shares with the other paths: topk_select.cuh.
#include <c10/cuda/CUDAException.h>

#include "dsa_indexer/topk_select.cuh"

namespace keye {
namespace {

// ---- Rows with group maxima (decode): one CTA per row, the search bounded by the maxima. ----
// The score kernel also wrote the maximum of every kScoreGroupKeys (8) consecutive scores of the row. Those maxima
// are distinct elements of the row, and so are the maxima of pairs of groups, so the topk-th largest of either set
// is at most the row's topk-th largest element: the lower edge lb of the first-digit bin that holds it bounds the
// selection from below, and every selected element lies in a group whose maximum reaches lb. Per row (one 512-
// thread CTA): the maxima as order keys into shared memory (one coalesced read), lb from a histogram of the pair
// maxima (or of the group maxima where there are fewer than 4 * topk pairs), the groups reaching lb listed in column
// order (~topk plus the bin's excess), their scores read (about an eighth of the row for independent scores) and
// the elements at or above lb kept as (order key, column) in column order, the list's threshold found
// (list_threshold), and the output written in order by one scan (no bitmap). Every ordered list comes from
// per-thread contiguous runs and one block scan. Rows with more groups than the staging area holds (past 256K
// columns), more groups at lb than the group list holds, or more candidates than the list holds (scores crowded
// into few groups, many ties) take the whole-row global path (exact, slower). Measured against the split chain:
// NOTES.md.
constexpr int kMaxGroups = 32768;              // staged maxima: rows up to 256K columns
constexpr int kGroupCap = 8192;                // groups whose maximum reaches lb
constexpr int kCandCap = 8192;                 // candidates (order key, column), in the staged maxima's place
constexpr int kGroupedData = kGroupCap * 4 + kMaxGroups * 4;
constexpr int kRoundGroups = 6;                // listed groups a thread loads at once (two 16-byte loads each)
static_assert(2 * kCandCap <= kMaxGroups, "the candidate list reuses the staged maxima's shared memory");
static_assert(kScoreGroupKeys == 8, "a group is two 16-byte vectors of scores");

__global__ void __launch_bounds__(kThreads, 1) topk_grouped_kernel(const GroupedRows a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
  uint8_t* data = smem_raw + ((sizeof(Shared) + 15) / 16) * 16;
  int* glist = reinterpret_cast<int*>(data);
  uint32_t* gkeys = reinterpret_cast<uint32_t*>(data + kGroupCap * 4);  // the maxima; then the candidates:
  uint32_t* lkeys = gkeys;                                               // their keys
  int* lcols = reinterpret_cast<int*>(gkeys + kCandCap);                 // and columns

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t r = blockIdx.x;
  const float* row = a.scores + r * a.ld;
  int* out_idx = a.indices + r * a.topk;
  float* out_sc = a.out_scores ? a.out_scores + r * a.topk : nullptr;
  const int n = row_length(a.lengths, r, a.cols);
  if (n <= a.topk) return emit_all(row, n, a.topk, out_idx, out_sc, a.offset);
  auto whole_row = [&] { select_whole_row(row, n, a.topk, sh, out_idx, out_sc, a.offset); };
  const int full = n / kScoreGroupKeys, groups = (n + kScoreGroupKeys - 1) / kScoreGroupKeys;
  if (groups > kMaxGroups) return whole_row();

  // The maxima as order keys into shared memory, whole 16-byte vectors (four groups) with all loads in flight at
  // once, and per thread the maxima of the pairs of groups in its vectors; warp 0 the up to three whole groups past
  // the last vector and the last, partial group (its maximum over the columns this row sees: the stored one may
  // include columns past its length).
  const float* gm = a.group_max + r * a.gm_ld;
  if (tid == 0) sh.list_max = 0;  // the largest candidate key (published by the barriers before the selection)
  const int vecs = full / 4;
  constexpr int kVecs = kMaxGroups / (4 * kThreads);
  uint32_t pmax[kVecs][2];
  {
    const float4* src = reinterpret_cast<const float4*>(gm) + tid;
    uint4* dst = reinterpret_cast<uint4*>(gkeys) + tid;
    float4 v[kVecs];
#pragma unroll
    for (int i = 0; i < kVecs; ++i)
      if (tid + i * kThreads < vecs) v[i] = __ldg(src + i * kThreads);
    for (int b = tid; b < kBins; b += kThreads) sh.hist[b] = 0;  // for the bound's histogram
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      pmax[i][0] = pmax[i][1] = 0;
      if (tid + i * kThreads < vecs) {
        const uint4 k = make_uint4(order_key(v[i].x), order_key(v[i].y), order_key(v[i].z), order_key(v[i].w));
        dst[i * kThreads] = k;
        pmax[i][0] = max(k.x, k.y);
        pmax[i][1] = max(k.z, k.w);
      }
    }
    if (warp == 0) {
      const int j = 4 * vecs + lane;  // lanes 0-2: whole groups past the vectors; lanes 8-15: the partial group
      if (lane < 3 && j < full) gkeys[j] = order_key(__ldg(gm + j));
      const int c = full * kScoreGroupKeys + lane - 8;
      float m = lane >= 8 && lane < 16 && c < n ? row[c] : -INFINITY;
#pragma unroll
      for (int o = 4; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));  // fmaxf skips NaN
      if (lane == 8 && full < groups) gkeys[full] = order_key(m);
    }
    __syncthreads();
  }

  // lb: the pair maxima when there are at least 4 * topk of them (a histogram from registers; for independent
  // scores about as tight as the group maxima: the topk-th largest of G / 2 maxima of 16 scores and of G maxima of 8
  // leave ~1.8% and ~1.7% of the row above them), else the group maxima; 0 (every element) with fewer than topk.
  uint32_t lb = 0;
  if (vecs >= 2 * a.topk || groups >= a.topk) {
    Threshold th;
    th.need = a.topk;
    if (vecs >= 2 * a.topk) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i)
        if (tid + i * kThreads < vecs) {
          atomicAdd(&sh.hist[pmax[i][0] >> (32 - kFirstBits)], 1u);
          atomicAdd(&sh.hist[pmax[i][1] >> (32 - kFirstBits)], 1u);
        }
    } else {
      count_digits(SmemKeys{gkeys}, 0, groups, 32 - kFirstBits, kFirstBits, th, sh);
    }
    __syncthreads();
    select_bin<kFirstBits>(32 - kFirstBits, th, sh);
    lb = th.prefix;
  }

  // The groups reaching lb, in column order: thread t takes `per` consecutive groups (a multiple of 4, read as
  // 16-byte vectors starting at a lane-rotated vector so a quarter warp's reads fall in different banks), marks
  // them in a 64-bit mask, and one block scan gives each thread its place in the list.
  const int per = (groups + 4 * kThreads - 1) / (4 * kThreads) * 4, nv = per / 4, t0 = tid * per;
  uint64_t reach = 0;
  for (int v = 0, vr = lane % nv; v < nv; ++v, vr = vr + 1 == nv ? 0 : vr + 1) {
    const int j = t0 + 4 * vr;
    uint32_t f = 0;
    if (j + 3 < groups) {
      const uint4 k = *reinterpret_cast<const uint4*>(gkeys + j);
      f = (k.x >= lb) | (k.y >= lb) << 1 | (k.z >= lb) << 2 | (k.w >= lb) << 3;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) f |= static_cast<uint32_t>(j + e < groups && gkeys[j + e] >= lb) << e;
    }
    reach |= static_cast<uint64_t>(f) << (4 * vr);
  }
  int total;
  int pos = block_exclusive_scan(__popcll(reach), sh, &total);
  const int listed = total;
  if (listed > kGroupCap) return whole_row();  // block-uniform
  for (uint64_t m = reach; m; m &= m - 1) glist[pos++] = t0 + __ffsll(static_cast<long long>(m)) - 1;
  __syncthreads();  // the group list is complete; the staged maxima are free

  // Their elements at or above lb, as (order key, column) in column order: thread t takes `per2` consecutive listed
  // groups, loads them kRoundGroups at a time (all loads of a round in flight), marks the kept elements in a mask
  // per round, and one block scan places every thread's candidates. The test is on values (x >= the value of lb is
  // key(x) >= lb for x not NaN; lb below key(-FLT_MAX) takes every element), as in collect().
  const bool all = lb < 0x00800000u;
  const float lb_value = key_value(lb);
  const int per2 = (listed + kThreads - 1) / kThreads, e0 = min(listed, tid * per2), e1 = min(listed, e0 + per2);
  auto load_round = [&](int e, float4 (&x)[kRoundGroups][2], int (&c0)[kRoundGroups]) {
#pragma unroll
    for (int g = 0; g < kRoundGroups; ++g) {
      c0[g] = e + g < e1 ? glist[e + g] * kScoreGroupKeys : n;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = c0[g] + 4 * h;
        if (c + 4 <= a.cols) {  // the whole vector lies in the row (columns past n are masked below)
          x[g][h] = c < n ? __ldg(reinterpret_cast<const float4*>(row + c)) : make_float4(0.f, 0.f, 0.f, 0.f);
        } else {
          x[g][h].x = c < n ? __ldg(row + c) : 0.f;
          x[g][h].y = c + 1 < n ? __ldg(row + c + 1) : 0.f;
          x[g][h].z = c + 2 < n ? __ldg(row + c + 2) : 0.f;
          x[g][h].w = c + 3 < n ? __ldg(row + c + 3) : 0.f;
        }
      }
    }
  };
  auto kept_mask = [&](const float4 (&x)[kRoundGroups][2], const int (&c0)[kRoundGroups]) {
    uint64_t m = 0;
#pragma unroll
    for (int g = 0; g < kRoundGroups; ++g)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float xs[4] = {x[g][h].x, x[g][h].y, x[g][h].z, x[g][h].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = c0[g] + 4 * h + e;
          m |= static_cast<uint64_t>(c < n && (all || xs[e] >= lb_value)) << (8 * g + 4 * h + e);
        }
      }
    return m;
  };
  uint32_t kmax = 0;
  auto write = [&](const float4 (&x)[kRoundGroups][2], const int (&c0)[kRoundGroups], uint64_t kept, int& at) {
#pragma unroll
    for (int g = 0; g < kRoundGroups; ++g)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float xs[4] = {x[g][h].x, x[g][h].y, x[g][h].z, x[g][h].w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if ((kept >> (8 * g + 4 * h + i)) & 1u) {
            const uint32_t k = order_key(xs[i]);
            kmax = max(kmax, k);
            lkeys[at] = k;
            lcols[at] = c0[g] + 4 * h + i;
            ++at;
          }
      }
  };
  // Usually (up to kRoundGroups * kThreads listed groups) one round: its loads stay in registers across the scan.
  const bool one_round = per2 <= kRoundGroups;  // block-uniform
  float4 x[kRoundGroups][2];
  int c0[kRoundGroups];
  uint64_t kept = 0;
  int count = 0;
  if (one_round) {
    load_round(e0, x, c0);
    kept = kept_mask(x, c0);
    count = __popcll(kept);
  } else {
    for (int e = e0; e < e1; e += kRoundGroups) {
      load_round(e, x, c0);
      count += __popcll(kept_mask(x, c0));
    }
  }
  pos = block_exclusive_scan(count, sh, &total);
  const int m = total;
  if (m > kCandCap) return whole_row();  // block-uniform
  if (one_round) {
    write(x, c0, kept, pos);
  } else {
    for (int e = e0; e < e1; e += kRoundGroups) {  // the second read is mostly from L1
      load_round(e, x, c0);
      write(x, c0, kept_mask(x, c0), pos);
    }
  }
  kmax = __reduce_max_sync(0xffffffffu, kmax);
  if (lane == 0) atomicMax(&sh.list_max, kmax);
  __syncthreads();

  // The exact selection on the list (every key >= lb, or any key when all).
  Threshold th;
  th.need = a.topk;
  list_threshold(lkeys, m, all ? 0u : lb, sh.list_max, th, sh);
  emit_ordered(lkeys, lcols, m, th, sh, out_idx, out_sc, a.offset);
}

}  // namespace

void launch_topk_grouped(const GroupedRows& a, int64_t rows, cudaStream_t stream) {
  const size_t smem = ((sizeof(Shared) + 15) / 16) * 16 + kGroupedData;  // Shared, then the data area
  C10_CUDA_CHECK(cudaFuncSetAttribute(topk_grouped_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  // A plain launch: as a programmatic dependent of the score kernel (CTAs that each hold a whole SM, resident early
  // and waiting; why that costs was not measured) the op took 1.6-4.7 us longer at every batch measured (NOTES.md,
  // twenty-second session).
  topk_grouped_kernel<<<static_cast<unsigned>(rows), kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace keye
