// Shared by the two sparse-attention forward kernels (sparse_attention_fwd.cu: a pair of queries per CTA;
// sparse_attention_fwd_blocks.cu: a block of 16 queries per CTA): the kernel parameters, the shared-memory tile
// layout and one online-softmax step of 16 rows (a query pair's heads) over one 16-key K/V tile (mma.sync), or, for
// the block kernel's common rows at D = 128, of a warpgroup's 64 rows over a 64-key stage (wgmma).
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "common/ptx.cuh"
#include "common/wgmma.cuh"
#include "sparse_attention/block_plan.h"
#include "sparse_attention/work_list.cuh"

namespace keye {
namespace sparse_attention {

template <int D>
struct Layout {
  static constexpr int kRowBytes = D * 2;
  static constexpr int kTileBytes = kTile * kRowBytes;
  static constexpr int kStageBytes = 2 * kTileBytes;  // K then V
};

struct FwdParams {
  IndexParams ix;
  const __nv_bfloat16* q;
  int64_t q_stride;  // elements between query rows; heads and dims contiguous
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  int64_t k_stride, v_stride;  // elements between K (V) rows; heads and dims contiguous
  int heads_kv, group;         // group = Hq / Hkv <= 16
  float scale_log2;            // softmax scale * log2(e)
  __nv_bfloat16* o;            // [N, Hq, D] (splits == 1)
  float* lse;                  // [N, Hq]
  float* o_part;               // [splits, N, Hq, D] (splits > 1)
  float* lse_part;             // [splits, N, Hq]
};

// The running state of 16 fragment rows: O accumulators (m16n8 layout, D / 8 column blocks), and per thread the
// running max (log2 units) and partial sum of its two rows (lane / 4 and lane / 4 + 8).
template <int D>
struct SoftmaxRows {
  float acc[D / 8][4];
  float m0, m1, l0, l1;

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.f;
    m0 = m1 = -INFINITY;
    l0 = l1 = 0.f;
  }
};

// The online-softmax part of one step over NT work-list tiles: raw scores s (Q K^T in the m16n8 accumulator layout,
// tile j's keys 0-7 in s[j][0], 8-15 in s[j][1]) are scaled, keys a row does not see (its seen bit is clear, or the
// slot is empty) score -inf; the running max, sum and O rescale are updated, and pa[j] gets tile j's P =
// exp2(s - max) as the A fragment of a 16x16 bf16 tile (P V is the caller's).
template <int D, int NT>
__device__ __forceinline__ void softmax_step(SoftmaxRows<D>& st, float (&s)[NT][2][4], const int (&entry)[NT],
                                             float scale_log2, uint32_t (&pa)[NT][4]) {
  const int cq = (threadIdx.x % 4) * 2;
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int e = __shfl_sync(0xffffffffu, entry[j], nt * 8 + cq + c);
        const bool lo = e >= 0 && (e & kSeenLo), hi = e >= 0 && (e & kSeenHi);
        s[j][nt][c] = lo ? s[j][nt][c] * scale_log2 : -INFINITY;
        s[j][nt][2 + c] = hi ? s[j][nt][2 + c] * scale_log2 : -INFINITY;
        mx0 = fmaxf(mx0, s[j][nt][c]);
        mx1 = fmaxf(mx1, s[j][nt][2 + c]);
      }
    }
  }
  const float mn0 = fmaxf(st.m0, quad_max(mx0)), mn1 = fmaxf(st.m1, quad_max(mx1));
  const float b0 = mn0 == -INFINITY ? 0.f : mn0, b1 = mn1 == -INFINITY ? 0.f : mn1;
  const float a0 = fast_exp2(st.m0 - b0), a1 = fast_exp2(st.m1 - b1);
  st.m0 = mn0;
  st.m1 = mn1;
  float ps[NT][2][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      ps[j][nt][0] = fast_exp2(s[j][nt][0] - b0);
      ps[j][nt][1] = fast_exp2(s[j][nt][1] - b0);
      ps[j][nt][2] = fast_exp2(s[j][nt][2] - b1);
      ps[j][nt][3] = fast_exp2(s[j][nt][3] - b1);
    }
  }
  float add0 = ps[0][0][0] + ps[0][0][1] + ps[0][1][0] + ps[0][1][1];
  float add1 = ps[0][0][2] + ps[0][0][3] + ps[0][1][2] + ps[0][1][3];
#pragma unroll
  for (int j = 1; j < NT; ++j) {
    add0 += ps[j][0][0] + ps[j][0][1] + ps[j][1][0] + ps[j][1][1];
    add1 += ps[j][0][2] + ps[j][0][3] + ps[j][1][2] + ps[j][1][3];
  }
  st.l0 = st.l0 * a0 + add0;
  st.l1 = st.l1 * a1 + add1;
  // Past the first tiles the running max rarely moves: skip the rescale (exact: the factors are 1) when no lane's
  // does, which saves D / 2 multiplies per lane and step.
  if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      st.acc[dn][0] *= a0;
      st.acc[dn][1] *= a0;
      st.acc[dn][2] *= a1;
      st.acc[dn][3] *= a1;
    }
  }
#pragma unroll
  for (int j = 0; j < NT; ++j) accumulators_to_a(pa[j], ps[j]);
}

// One step of the online softmax over NT work-list tiles (K tile ks[j], V tile vs[j] in shared memory; their
// entries in entry[j], see tile_entry): S = Q K^T, softmax_step, then O += P V. NT = 2 (the block kernel's common
// rows, two tiles per stage) takes one running-max update, one rescale and one shuffle reduction per 32 keys, and
// its four S chains are independent.
template <int D, int NT>
__device__ __forceinline__ void attend_tiles(SoftmaxRows<D>& st, const uint32_t (&q)[D / 16][4],
                                             const uint8_t* const (&ks)[NT], const uint8_t* const (&vs)[NT],
                                             const int (&entry)[NT], float scale_log2) {
  float s[NT][2][4];  // tile j: keys 0-7 (s[j][0]) and 8-15 (s[j][1])
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) s[j][nt][0] = s[j][nt][1] = s[j][nt][2] = s[j][nt][3] = 0.f;
    rows_times_tile_t<D>(s[j], q, ks[j]);
  }
  uint32_t pa[NT][4];
  softmax_step<D, NT>(st, s, entry, scale_log2, pa);
  // O += P V: each tile's two S accumulators are exactly the A fragment of a 16x16 P tile.
#pragma unroll
  for (int j = 0; j < NT; ++j) fragment_times_tile<D>(st.acc, pa[j], vs[j]);
}

// A CTA-wide stage of kWgKeys common rows in the layout wgmma reads (D = 128; the block forward's phase 1): K as
// [2][kWgKeys][128 B] (dims 0-63 of every row, then dims 64-127; 16-byte chunk c of row r at chunk c ^ (r % 8), the
// 128-byte swizzle), V the same kWgHalfBytes * 2 later; slots past the list zero-filled. dst must be 1024-aligned.
// Each of kLanes threads copies one 16-byte chunk of kWgRows(kLanes) rows; their entries come from
// stage_entries_wgmma, loaded a stage before the copies are issued: loaded in line, each stage's copies waited one
// L2 round trip for their row numbers right after the CTA barrier, in the critical path (NOTES.md, issue 4).
constexpr int kWgKeys = 64;  // keys per stage: one m64n64k16 S product per k-step
constexpr int kWgTiles = kWgKeys / kTile;  // 16-key work-list tiles per stage
constexpr int kWgHalfBytes = kWgKeys * 128;
constexpr int kWgStageBytes = 4 * kWgHalfBytes;  // K and V, two halves each
template <int kLanes>
constexpr int kWgRows = kWgKeys / (kLanes / 16);  // rows per thread and stage (16 chunks per row)

template <int kLanes>
__device__ __forceinline__ void stage_entries_wgmma(int (&e)[kWgRows<kLanes>], const int* work, int count_work,
                                                    int stage) {
  static_assert(kWgKeys % (kLanes / 16) == 0, "the stage's rows must divide among the lanes");
#pragma unroll
  for (int i = 0; i < kWgRows<kLanes>; ++i) {
    const int slot = stage * kWgKeys + static_cast<int>(threadIdx.x) / 16 + i * (kLanes / 16);
    e[i] = slot < count_work ? work[slot] : -1;
  }
}

template <int kLanes>
__device__ __forceinline__ void gather_stage_wgmma(uint8_t* dst, const int (&e)[kWgRows<kLanes>],
                                                   const __nv_bfloat16* k, int64_t k_stride, const __nv_bfloat16* v,
                                                   int64_t v_stride, int g) {
  constexpr int D = 128, kChunks = D / 8, kRowsPerPass = kLanes / kChunks;
  const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  const int half = c / 8, cc = c % 8;
#pragma unroll
  for (int i = 0; i < kWgRows<kLanes>; ++i) {
    const int r = r0 + i * kRowsPerPass;
    const int64_t row = e[i] < 0 ? 0 : (e[i] & kRowMask);
    const int off = half * kWgHalfBytes + r * 128 + ((cc ^ (r & 7)) << 4);
    cp_async16_unless_negative(dst + off, k + row * k_stride + g * D + c * 8, e[i]);
    cp_async16_unless_negative(dst + 2 * kWgHalfBytes + off, v + row * v_stride + g * D + c * 8, e[i]);
  }
}

// attend_tiles<128, kWgTiles> over a gather_stage_wgmma stage with the two products on wgmma: all four warps of a
// warpgroup call it together, each with its own 16 rows (the A-fragment and accumulator layouts of wgmma per warp
// are the mma.sync m16n8k16 ones, so Q's fragments, the softmax and O carry over unchanged). S = Q K^T is
// m64n{kWgKeys}k16 with K as the K-major operand, O += P V is m64n128k16 with V as the MN-major one. The P V product
// is left running: the next call's wait (or the caller's wgmma_wait<0>() and fence_operands(st.acc)) completes it,
// and the stage's slot must not be refilled before that.
__device__ __forceinline__ void attend_stage_wgmma(SoftmaxRows<128>& st, const uint32_t (&q)[8][4], const uint8_t* kv,
                                                   const int (&entry)[kWgTiles], float scale_log2) {
  float d[kWgKeys / 2];
#pragma unroll
  for (int i = 0; i < kWgKeys / 2; ++i) d[i] = 0.f;
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
    wgmma_m64n64k16_bf16_rs(d, q[kk], smem_desc<128>(kv + (kk / 4) * kWgHalfBytes) + 2 * (kk % 4), kk);
  wgmma_commit();
  wgmma_wait<0>();  // this S product and the previous call's P V product
  fence_operands(d);
  fence_operands(st.acc);
  float s[kWgTiles][2][4];
#pragma unroll
  for (int j = 0; j < kWgTiles; ++j)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[j][nt][c] = d[4 * (2 * j + nt) + c];
  uint32_t pa[kWgTiles][4];
  softmax_step<128, kWgTiles>(st, s, entry, scale_log2, pa);
  fence_operands(st.acc);
  wgmma_fence();
#pragma unroll
  for (int j = 0; j < kWgTiles; ++j)
    wgmma_m64n128k16_bf16_rs_mn(st.acc, pa[j],
                                smem_desc_mn128(kv + 2 * kWgHalfBytes + j * 16 * 128, kWgHalfBytes, 8 * 128));
  wgmma_commit();
}

// attend_tiles over one tile.
template <int D>
__device__ __forceinline__ void attend_tile(SoftmaxRows<D>& st, const uint32_t (&q)[D / 16][4], const uint8_t* ks,
                                            const uint8_t* vs, int entry, float scale_log2) {
  const uint8_t* const k1[1] = {ks};
  const uint8_t* const v1[1] = {vs};
  const int e1[1] = {entry};
  attend_tiles<D, 1>(st, q, k1, v1, e1, scale_log2);
}

// The block forward kernel (sparse_attention_fwd_blocks.cu): one CTA per (16 queries, KV head) over `plan`;
// writes p.o and p.lse (one split). d: head dim, 64 or 128.
void launch_fwd_blocks(const FwdParams& p, const BlockPlan& plan, int d, cudaStream_t stream);

}  // namespace sparse_attention
}  // namespace keye
