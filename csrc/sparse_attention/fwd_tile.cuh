// Shared by the two sparse-attention forward kernels (sparse_attention_fwd.cu: a pair of queries per CTA;
// sparse_attention_fwd_blocks.cu: a block of 16 queries per CTA): the kernel parameters, the shared-memory tile
// layout and one online-softmax step of 16 rows (a query pair's heads) over one 16-key K/V tile.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "common/ptx.cuh"
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

// One step of the online softmax over NT work-list tiles (K tile ks[j], V tile vs[j] in shared memory; their
// entries in entry[j], see tile_entry): S = Q K^T, keys a row does not see (its seen bit is clear, or the slot is
// empty) score -inf; then O = O * alpha + P V. NT = 2 (the block kernel's common rows, two tiles per stage) takes
// one running-max update, one rescale and one shuffle reduction per 32 keys, and its four S chains are independent.
template <int D, int NT>
__device__ __forceinline__ void attend_tiles(SoftmaxRows<D>& st, const uint32_t (&q)[D / 16][4],
                                             const uint8_t* const (&ks)[NT], const uint8_t* const (&vs)[NT],
                                             const int (&entry)[NT], float scale_log2) {
  const int cq = (threadIdx.x % 4) * 2;
  float s[NT][2][4];  // tile j: keys 0-7 (s[j][0]) and 8-15 (s[j][1])
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) s[j][nt][0] = s[j][nt][1] = s[j][nt][2] = s[j][nt][3] = 0.f;
    rows_times_tile_t<D>(s[j], q, ks[j]);
  }

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
  const float a0 = exp2f(st.m0 - b0), a1 = exp2f(st.m1 - b1);
  st.m0 = mn0;
  st.m1 = mn1;
  float ps[NT][2][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      ps[j][nt][0] = exp2f(s[j][nt][0] - b0);
      ps[j][nt][1] = exp2f(s[j][nt][1] - b0);
      ps[j][nt][2] = exp2f(s[j][nt][2] - b1);
      ps[j][nt][3] = exp2f(s[j][nt][3] - b1);
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
  // O += P V: each tile's two S accumulators are exactly the A fragment of a 16x16 P tile.
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    uint32_t pa[4];
    accumulators_to_a(pa, ps[j]);
    fragment_times_tile<D>(st.acc, pa, vs[j]);
  }
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
