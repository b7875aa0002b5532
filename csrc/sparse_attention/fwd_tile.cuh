// Shared by the two sparse-attention forward kernels (sparse_attention_fwd.cu: a pair of queries per CTA;
// sparse_attention_fwd_blocks.cu: a block of 16 queries per CTA): the kernel parameters, the shared-memory tile
// layout and one online-softmax step of 16 rows (a query pair's heads) over one 16-key K/V tile (mma.sync); for
// the block kernel, the same for a warpgroup's 64 rows over a 64-key stage of common rows at D = 128 (wgmma), and
// one query's heads over a 16-key tile of its own rows, transposed (phase 2; mma.sync).
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

// The reference max of an online-softmax step: row maxima nm0 / nm1 (log2 units) of this step's scores come in;
// out come the bases b0 / b1 this step's P = exp2(s - b) takes and the factors a0 / a1 O's two rows must be rescaled
// by (rescale_rows) before this P V is added. The reference moves only when a row's new maximum passes it by more
// than kMaxSlack, so P stays below 2^kMaxSlack and the steps that keep it skip O's rescale; the result is exact
// either way (O and l share the reference). With a strict max, O was rescaled in ~3 of 4 64-key stages of random
// scores. (Phase 2's attend_own_tile keeps a strict max on its transposed state: after phase 1's common rows its
// max rarely moves, and the slack there was not measured.)
template <int D>
__device__ __forceinline__ void move_reference_max(SoftmaxRows<D>& st, float nm0, float nm1, float& b0, float& b1,
                                                   float& a0, float& a1) {
  constexpr float kMaxSlack = 8.f;
  const float mn0 = nm0 > st.m0 + kMaxSlack ? nm0 : st.m0, mn1 = nm1 > st.m1 + kMaxSlack ? nm1 : st.m1;
  b0 = mn0 == -INFINITY ? 0.f : mn0;
  b1 = mn1 == -INFINITY ? 0.f : mn1;
  a0 = fast_exp2(st.m0 - b0);
  a1 = fast_exp2(st.m1 - b1);
  st.m0 = mn0;
  st.m1 = mn1;
}

// The end of an online-softmax step over NT work-list tiles, once the scores in s are scaled and masked (keys a row
// does not see at -inf) and mx0 / mx1 are this thread's maxima of its two rows: the reference max moves
// (move_reference_max), s becomes P = exp2(s - b) (fp32), and the sums are updated.
template <int D, int NT>
__device__ __forceinline__ void softmax_finish(SoftmaxRows<D>& st, float (&s)[NT][2][4], float mx0, float mx1,
                                               float& a0, float& a1) {
  float b0, b1;
  move_reference_max(st, quad_max(mx0), quad_max(mx1), b0, b1, a0, a1);
  float (&ps)[NT][2][4] = s;
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
}

// softmax_finish over raw scores s (Q K^T in the m16n8 accumulator layout, tile j's keys 0-7 in s[j][0], 8-15 in
// s[j][1]) masked by the tiles' entries: a key scores -inf for a row whose seen bit is clear, or in an empty slot.
template <int D, int NT>
__device__ __forceinline__ void softmax_scores(SoftmaxRows<D>& st, float (&s)[NT][2][4], const int (&entry)[NT],
                                               float scale_log2, float& a0, float& a1) {
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
  softmax_finish<D, NT>(st, s, mx0, mx1, a0, a1);
}

// O's two rows times a0 / a1 (softmax_scores). Past the first tiles the running max rarely moves: skip the rescale
// (exact: the factors are 1) when no lane's does, which saves D / 2 multiplies per lane and step.
template <int D>
__device__ __forceinline__ void rescale_rows(SoftmaxRows<D>& st, float a0, float a1) {
  if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      st.acc[dn][0] *= a0;
      st.acc[dn][1] *= a0;
      st.acc[dn][2] *= a1;
      st.acc[dn][3] *= a1;
    }
  }
}

// softmax_scores, rescale_rows, and pa[j] = tile j's P as the A fragment of a 16x16 bf16 tile (P V is the caller's).
template <int D, int NT>
__device__ __forceinline__ void softmax_step(SoftmaxRows<D>& st, float (&s)[NT][2][4], const int (&entry)[NT],
                                             float scale_log2, uint32_t (&pa)[NT][4]) {
  float a0, a1;
  softmax_scores<D, NT>(st, s, entry, scale_log2, a0, a1);
  rescale_rows<D>(st, a0, a1);
#pragma unroll
  for (int j = 0; j < NT; ++j) accumulators_to_a(pa[j], s[j]);
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

// attend_tiles<128, kWgTiles> over gather_stage_wgmma stages with both products on wgmma, in pieces the caller
// orders so a stage's softmax runs while the previous stage's P V product is on the tensor cores (FlashAttention-3's
// intra-warpgroup order). All four warps of a warpgroup call each piece together, each with its own 16 rows (the
// A-fragment and accumulator layouts of wgmma per warp are the mma.sync m16n8k16 ones, so Q's fragments, the
// softmax and O carry over unchanged).
// stage_scores_wgmma: issues S = Q K^T into d (m64n{kWgKeys}k16, K the K-major operand) as one commit group.
__device__ __forceinline__ void stage_scores_wgmma(float (&d)[kWgKeys / 2], const uint32_t (&q)[8][4],
                                                   const uint8_t* kv) {
  // No zeroing of d: the first k-step does not accumulate (scale-d 0).
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
    wgmma_m64n64k16_bf16_rs(d, q[kk], smem_desc<128>(kv + (kk / 4) * kWgHalfBytes) + 2 * (kk % 4), kk);
  wgmma_commit();
}

// stage_softmax_wgmma: the online-softmax step of a completed S of common rows in d (d becomes P, fp32; O's factors
// in a0 / a1). Every query of the block sees every row of the common list, so the only keys to mask are the slots
// past its end, by position (valid = the list's length minus the stage's first slot; the caller passes kMasked =
// false for a full stage, which then takes no mask at all). Masked by the entries' seen bits, as the other tiles
// are, every stage paid a shuffle per 8 keys and three instructions per score: 5% of the realistic 32K forward.
// scale_log2 must be >= 0 (the block kernel folds a negative scale into Q), so the scale goes into the exponent,
// P = exp2(s * scale - b) with b = scale * max s, one FFMA per score; maxima and sums reduce as trees (a loop of
// dependent fmaxf was 16 long). Both: realistic 32K forward -1%.
template <bool kMasked>
__device__ __forceinline__ void stage_softmax_wgmma(SoftmaxRows<128>& st, float (&d)[kWgKeys / 2], int valid,
                                                    float scale_log2, float& a0, float& a1) {
  fence_operands(d);
  float(&s)[kWgTiles][2][4] = *reinterpret_cast<float(*)[kWgTiles][2][4]>(&d);
  const int vq = valid - (static_cast<int>(threadIdx.x) % 4) * 2;  // key j * 16 + nt * 8 + c is valid iff < vq
  auto keep = [&](int j, int nt, int c) { return !kMasked || j * 16 + nt * 8 + c < vq; };
  static_assert(kWgTiles * 4 == 16, "a row's 16 scores per thread reduce in four levels");
  float r0[16], r1[16];
#pragma unroll
  for (int j = 0; j < kWgTiles; ++j)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        r0[(j * 2 + nt) * 2 + c] = keep(j, nt, c) ? s[j][nt][c] : -INFINITY;
        r1[(j * 2 + nt) * 2 + c] = keep(j, nt, c) ? s[j][nt][2 + c] : -INFINITY;
      }
  // Four levels written out: as one loop over the level width, that loop was not unrolled and r0 / r1 went to the
  // stack.
#pragma unroll
  for (int i = 0; i < 8; ++i) r0[i] = fmaxf(r0[i], r0[i + 8]), r1[i] = fmaxf(r1[i], r1[i + 8]);
#pragma unroll
  for (int i = 0; i < 4; ++i) r0[i] = fmaxf(r0[i], r0[i + 4]), r1[i] = fmaxf(r1[i], r1[i + 4]);
#pragma unroll
  for (int i = 0; i < 2; ++i) r0[i] = fmaxf(r0[i], r0[i + 2]), r1[i] = fmaxf(r1[i], r1[i + 2]);
  r0[0] = fmaxf(r0[0], r0[1]), r1[0] = fmaxf(r1[0], r1[1]);
  float b0, b1;
  move_reference_max(st, quad_max(r0[0]) * scale_log2, quad_max(r1[0]) * scale_log2, b0, b1, a0, a1);
  float add0[kWgTiles], add1[kWgTiles];
#pragma unroll
  for (int j = 0; j < kWgTiles; ++j) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float p0 = fast_exp2(fmaf(s[j][nt][c], scale_log2, -b0));
        const float p1 = fast_exp2(fmaf(s[j][nt][2 + c], scale_log2, -b1));
        s[j][nt][c] = keep(j, nt, c) ? p0 : 0.f;
        s[j][nt][2 + c] = keep(j, nt, c) ? p1 : 0.f;
      }
    add0[j] = (s[j][0][0] + s[j][0][1]) + (s[j][1][0] + s[j][1][1]);
    add1[j] = (s[j][0][2] + s[j][0][3]) + (s[j][1][2] + s[j][1][3]);
  }
  st.l0 = st.l0 * a0 + ((add0[0] + add0[1]) + (add0[2] + add0[3]));
  st.l1 = st.l1 * a1 + ((add1[0] + add1[1]) + (add1[2] + add1[3]));
}

// stage_p_fragments: P from stage_softmax_wgmma (fp32, in d) as the bf16 A fragments of stage_pv_wgmma.
__device__ __forceinline__ void stage_p_fragments(uint32_t (&pa)[kWgTiles][4], const float (&d)[kWgKeys / 2]) {
  const float(&p)[kWgTiles][2][4] = *reinterpret_cast<const float(*)[kWgTiles][2][4]>(&d);
#pragma unroll
  for (int j = 0; j < kWgTiles; ++j) accumulators_to_a(pa[j], p[j]);
}

// stage_pv_wgmma: with the previous P V product completed, rescales O by a0 / a1 and issues O += P V (m64n128k16,
// V the MN-major operand; P as bf16 A fragments in pa) as one commit group, left running: the stage's slot and pa
// must not be reused, nor O read, before a wait completes it.
__device__ __forceinline__ void stage_pv_wgmma(SoftmaxRows<128>& st, const uint32_t (&pa)[kWgTiles][4],
                                               const uint8_t* kv, float a0, float a1) {
  fence_operands(st.acc);
  rescale_rows<128>(st, a0, a1);
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

// The online-softmax state of one query's G <= 8 heads, transposed (the block forward's phase 2): O^T [D dims x 8
// heads] as D / 16 m16n8 accumulators (acc[mt]: dims 16 mt + lane / 4 ([0], [1]) and + 8 ([2], [3]); heads
// 2 (lane % 4) ([0], [2]) and + 1 ([1], [3])), the running max of the thread's two heads (log2 units; equal on the 8
// lanes that share lane % 4) and the thread's partial sums of them.
template <int D>
struct SoftmaxCols {
  float acc[D / 16][4];
  float m[2], l[2];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
  }
};

// Moves a pair's SoftmaxRows (rows 0-7 query a's heads, 8-15 query b's) into one SoftmaxCols per query through
// `scratch` (this warp's, 16 * D floats), so phase 1's state carries into phase 2. Ends with the scratch free.
template <int D>
__device__ __forceinline__ void rows_to_cols(const SoftmaxRows<D>& st, SoftmaxCols<D>& a, SoftmaxCols<D>& b,
                                             float* scratch) {
  const int lane = threadIdx.x % 32, r = lane / 4, cq = (lane % 4) * 2;
  // [16 rows][D] with the 8-float groups of row x XOR-ed by (x / 2) % 4: the row-layout writes (rows r, 8 floats
  // each) take the minimum 2 wavefronts, the column-layout reads (rows cq + j, 8 floats each) 1.
  auto at = [](int row, int dim) { return row * D + (dim ^ (((row >> 1) & 3) << 3)); };
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    *reinterpret_cast<float2*>(scratch + at(r, dn * 8 + cq)) = make_float2(st.acc[dn][0], st.acc[dn][1]);
    *reinterpret_cast<float2*>(scratch + at(r + 8, dn * 8 + cq)) = make_float2(st.acc[dn][2], st.acc[dn][3]);
  }
  __syncwarp();
  const float l0 = quad_sum(st.l0), l1 = quad_sum(st.l1);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    // Row cq + j's max and sum sit in lanes 4 (cq + j) .. + 3 (st.m0, l0: query a; st.m1, l1: query b). The whole
    // sum goes to the lanes with r = 0 and the others start at 0, so the 8 lanes' partial sums add up to it.
    const int src = 4 * (cq + j);
    a.m[j] = __shfl_sync(0xffffffffu, st.m0, src);
    b.m[j] = __shfl_sync(0xffffffffu, st.m1, src);
    const float la = __shfl_sync(0xffffffffu, l0, src), lb = __shfl_sync(0xffffffffu, l1, src);
    a.l[j] = r == 0 ? la : 0.f;
    b.l[j] = r == 0 ? lb : 0.f;
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        a.acc[mt][2 * h + j] = scratch[at(cq + j, 16 * mt + r + 8 * h)];
        b.acc[mt][2 * h + j] = scratch[at(8 + cq + j, 16 * mt + r + 8 * h)];
      }
    }
  }
  __syncwarp();
}

// One online-softmax step of one query's heads over a 16-key tile of its own rows (K tile ks, V tile vs; lane l
// holds the entry of slot l % 16, tile_entry): S^T = K Q^T as m16n8k16 (16 keys x 8 heads; qt[kk] = the query's
// fragment-row registers {f[kk][0], f[kk][2]} (query a) or {f[kk][1], f[kk][3]} (b) of load_row_fragments, which
// are the B operand as they are), the softmax down each head's column, P^T to a B fragment by movmatrix, O^T +=
// V^T P^T. attend_tile over a pair's 16 rows computes every tile for both queries' heads, so a tile of one query's
// keys there costs twice the mma and softmax work.
template <int D>
__device__ __forceinline__ void attend_own_tile(SoftmaxCols<D>& st, const uint32_t (&qt)[D / 16][2], const uint8_t* ks,
                                                const uint8_t* vs, int entry, float scale_log2) {
  const int lane = threadIdx.x % 32, mi = lane / 8;
  // Lanes 8i..8i+7 address ldmatrix's matrix i: for K (the A operand of S^T) keys 0-7 / 8-15 / 0-7 / 8-15 at dims
  // lo / lo / hi / hi, for V (read transposed: the A operand of O^T) keys 0-7 / 0-7 / 8-15 / 8-15 at dims lo / hi /
  // lo / hi: both come out in A-fragment order (mma takes its fragments in consecutive registers; a permutation
  // here cost four moves per ldmatrix).
  const int rk = (mi % 2) * 8 + lane % 8, rv = (mi / 2) * 8 + lane % 8;
  float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // even and odd k-steps: two chains
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, ks + rk * D * 2 + swizzle(rk, kk * 2 + mi / 2) * 16);
    mma_bf16_m16n8k16(s[kk % 2], a, qt[kk]);
  }
  // Keys lane / 4 ([0], [1]) and lane / 4 + 8 ([2], [3]); every head of the query sees its own keys, so only empty
  // slots are masked.
  const int e0 = __shfl_sync(0xffffffffu, entry, lane / 4), e1 = __shfl_sync(0xffffffffu, entry, lane / 4 + 8);
  float x[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) x[c] = (c < 2 ? e0 : e1) >= 0 ? (s[0][c] + s[1][c]) * scale_log2 : -INFINITY;
  float mx[2] = {fmaxf(x[0], x[2]), fmaxf(x[1], x[3])};
#pragma unroll
  for (int d = 4; d < 32; d *= 2)
#pragma unroll
    for (int j = 0; j < 2; ++j) mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], d));
  float alpha[2], base[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const float mn = fmaxf(st.m[j], mx[j]);
    base[j] = mn == -INFINITY ? 0.f : mn;
    alpha[j] = fast_exp2(st.m[j] - base[j]);
    st.m[j] = mn;
  }
  float pr[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) pr[c] = fast_exp2(x[c] - base[c % 2]);
  st.l[0] = st.l[0] * alpha[0] + pr[0] + pr[2];
  st.l[1] = st.l[1] * alpha[1] + pr[1] + pr[3];
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) st.acc[mt][c] *= alpha[c % 2];
  }
  // P^T (keys x heads) in the accumulator layout, transposed per 8x8 block: lane l then holds P^T[keys 2 (l % 4),
  // + 1][head l / 4] (and keys + 8), the B fragment of O^T += V^T P^T.
  const uint32_t pb[2] = {movmatrix_trans(pack_bf16x2(pr[0], pr[1])), movmatrix_trans(pack_bf16x2(pr[2], pr[3]))};
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt) {
    uint32_t a[4];
    ldmatrix_x4_trans(a, vs + rv * D * 2 + swizzle(rv, 2 * mt + mi % 2) * 16);
    mma_bf16_m16n8k16(st.acc[mt], a, pb);
  }
}

// The block forward kernel (sparse_attention_fwd_blocks.cu): one CTA per (16 queries, KV head) over `plan`;
// writes p.o and p.lse (one split). d: head dim, 64 or 128.
void launch_fwd_blocks(const FwdParams& p, const BlockPlan& plan, int d, cudaStream_t stream);

}  // namespace sparse_attention
}  // namespace keye
