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

// One step of the online softmax: S = Q K^T over a work-list tile (K tile ks, V tile vs in shared memory; its
// entries in `entry`, see tile_entry), keys a row does not see (its seen bit is clear, or the slot is empty) score
// -inf; then O = O * alpha + P V.
template <int D>
__device__ __forceinline__ void attend_tile(SoftmaxRows<D>& st, const uint32_t (&q)[D / 16][4], const uint8_t* ks,
                                            const uint8_t* vs, int entry, float scale_log2) {
  const int cq = (threadIdx.x % 4) * 2;
  float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // keys 0-7 (s[0]) and 8-15 (s[1]) of the tile
  rows_times_tile_t<D>(s, q, ks);

  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int e = __shfl_sync(0xffffffffu, entry, nt * 8 + cq + j);
      const bool lo = e >= 0 && (e & kSeenLo), hi = e >= 0 && (e & kSeenHi);
      s[nt][j] = lo ? s[nt][j] * scale_log2 : -INFINITY;
      s[nt][2 + j] = hi ? s[nt][2 + j] * scale_log2 : -INFINITY;
      mx0 = fmaxf(mx0, s[nt][j]);
      mx1 = fmaxf(mx1, s[nt][2 + j]);
    }
  }
  const float mn0 = fmaxf(st.m0, quad_max(mx0)), mn1 = fmaxf(st.m1, quad_max(mx1));
  const float b0 = mn0 == -INFINITY ? 0.f : mn0, b1 = mn1 == -INFINITY ? 0.f : mn1;
  const float a0 = exp2f(st.m0 - b0), a1 = exp2f(st.m1 - b1);
  st.m0 = mn0;
  st.m1 = mn1;
  float ps[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    ps[nt][0] = exp2f(s[nt][0] - b0);
    ps[nt][1] = exp2f(s[nt][1] - b0);
    ps[nt][2] = exp2f(s[nt][2] - b1);
    ps[nt][3] = exp2f(s[nt][3] - b1);
  }
  st.l0 = st.l0 * a0 + (ps[0][0] + ps[0][1] + ps[1][0] + ps[1][1]);
  st.l1 = st.l1 * a1 + (ps[0][2] + ps[0][3] + ps[1][2] + ps[1][3]);
  // Past the first tiles the running max rarely moves: skip the rescale (exact: the factors are 1) when no lane's
  // does, which saves D / 2 multiplies per lane and tile.
  if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      st.acc[dn][0] *= a0;
      st.acc[dn][1] *= a0;
      st.acc[dn][2] *= a1;
      st.acc[dn][3] *= a1;
    }
  }
  // O += P V: the two S accumulators are exactly the A fragment of a 16x16 P tile.
  uint32_t pa[4];
  accumulators_to_a(pa, ps);
  fragment_times_tile<D>(st.acc, pa, vs);
}

// The block forward kernel (sparse_attention_fwd_blocks.cu): one CTA per (16 queries, KV head) over `plan`;
// writes p.o and p.lse (one split). d: head dim, 64 or 128.
void launch_fwd_blocks(const FwdParams& p, const BlockPlan& plan, int d, cudaStream_t stream);

}  // namespace sparse_attention
}  // namespace keye
