// Shared by the two sparse-attention backward kernels (sparse_attention_bwd.cu: a pair of queries per CTA, its
// tiles spread over the warps; sparse_attention_bwd_blocks.cu: a block of 16 queries per CTA): the kernel
// parameters, a warp's 16 fragment rows and one backward step of those rows over one 16-key K/V tile.
//
// Per tile: S = Q K^T and P = exp(S - lse) from the saved lse, then
//   dP = dO V^T,  dS = P (dP - delta) * scale       (delta = rowsum(dO o) - dlse, precomputed)
//   dQ += dS K                                         (registers)            } tile_scores
//   dV[key] += P^T dO,  dK[key] += dS^T Q             (16 keys x D)           } key_products
// P and dS go through a small per-warp shared-memory tile to be read back transposed (ldmatrix.trans) as the A
// operand of the two key-major products; Q and dO are read from shared memory as the B operand. The split lets
// the block kernel run the key-major products over all its warps' rows at once (K = 128 rows, not 16).
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "common/ptx.cuh"
#include "sparse_attention/block_plan.h"
#include "sparse_attention/work_list.cuh"

namespace keye {
namespace sparse_attention {

struct BwdParams {
  IndexParams ix;
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  const __nv_bfloat16* dout;
  int64_t q_stride, k_stride, v_stride, do_stride;
  const float* lse;    // [N, Hq]
  const float* delta;  // [N, Hq]
  int heads_kv, group;
  float scale, scale_log2;
  // Zero-initialised accumulators: fp32 (fast mode), or int64 fixed point when `fixed` is set.
  float* dq;  // [N, Hq, D]
  float* dk;  // [S, Hkv, D]
  float* dv;
  // Deterministic mode: [3] powers of two for dq, dk, dv. Every addend x is added as the integer nearest to
  // x * scale; integer sums do not depend on the order the atomics arrive in, so the result is bitwise the same
  // run to run. The caller picks scales that keep every sum below 2^62 (keye/ops/sparse_attention.py).
  const float* fixed;
};

// Per-kernel copy of the fixed-point scales (read once; `on` false in fast mode).
struct GradScales {
  bool on;
  float dq, dk, dv;
};

__device__ __forceinline__ GradScales grad_scales(const BwdParams& p) {
  if (p.fixed == nullptr) return {false, 0.f, 0.f, 0.f};
  return {true, p.fixed[0], p.fixed[1], p.fixed[2]};
}

// x * scale (exact: scale is a power of two and the caller's bound keeps it in range) rounded to an integer.
__device__ __forceinline__ unsigned long long to_fixed(float scaled) {
  return static_cast<unsigned long long>(__float2ll_rn(scaled));
}

// The dK / dV atomics for this lane's dims (col, col + 1) of two key rows (element offsets off0 / off1, added when
// ok0 / ok1; the 4 lanes of a quad share the rows, so ok is uniform over the quad).
// Fast mode: float2 atomics (red.global.add.v2.f32). 16-byte atomics (lanes swapping halves first) measured the
// same time to 0.3% on the H200: these atomics are bound by the L2 sectors they touch (ncu: L2 80-91% busy, hit
// rate 99%, DRAM 1%), not by the number of operations.
// Deterministic mode: 64-bit integer atomics (no vector form). Lanes q and q ^ 2 of a quad first swap one value
// each, so that each instruction's 4 lanes write 4 consecutive int64 (dims 0-3, then 4-7 of the 8-dim group: one
// 32-byte sector) rather than every other one (two sectors; ncu: 4x the fast mode's reduction sectors).
__device__ __forceinline__ void add_key_grads(const BwdParams& p, const GradScales& sc, int which, int64_t off0,
                                              bool ok0, float a0, float a1, int64_t off1, bool ok1, float b0,
                                              float b1) {
  float* base = which ? p.dk : p.dv;
  if (!sc.on) {
    if (ok0) atomicAdd(reinterpret_cast<float2*>(base + off0), make_float2(a0, a1));
    if (ok1) atomicAdd(reinterpret_cast<float2*>(base + off1), make_float2(b0, b1));
    return;
  }
  // Quad lane q holds dims 2q, 2q + 1. After the swap lanes 0-3 hold (0, 4), (2, 6), (1, 5), (3, 7).
  const bool low = (threadIdx.x & 2) == 0;
  const float ga = __shfl_xor_sync(0xffffffffu, low ? a1 : a0, 2);
  const float gb = __shfl_xor_sync(0xffffffffu, low ? b1 : b0, 2);
  const int shift = low ? 0 : -3;  // first dim held, relative to 2q
  const float s = which ? sc.dk : sc.dv;
  unsigned long long* dst = reinterpret_cast<unsigned long long*>(base);
  if (ok0) {
    atomicAdd(dst + (off0 + shift), to_fixed((low ? a0 : ga) * s));
    atomicAdd(dst + (off0 + shift + 4), to_fixed((low ? ga : a1) * s));
  }
  if (ok1) {
    atomicAdd(dst + (off1 + shift), to_fixed((low ? b0 : gb) * s));
    atomicAdd(dst + (off1 + shift + 4), to_fixed((low ? gb : b1) * s));
  }
}

// dQ added by a CTA that does not own the element alone (the pair kernel's merge).
__device__ __forceinline__ void add_query_grad(const BwdParams& p, const GradScales& sc, int64_t off, float x) {
  if (sc.on) atomicAdd(reinterpret_cast<unsigned long long*>(p.dq) + off, to_fixed(x * sc.dq));
  else atomicAdd(p.dq + off, x);
}

// dQ of two adjacent elements stored by their only writer (the block kernel).
__device__ __forceinline__ void store_query_grad(const BwdParams& p, const GradScales& sc, int64_t off, float a,
                                                 float b) {
  if (sc.on)
    *reinterpret_cast<longlong2*>(reinterpret_cast<long long*>(p.dq) + off) =
        make_longlong2(__float2ll_rn(a * sc.dq), __float2ll_rn(b * sc.dq));
  else
    *reinterpret_cast<float2*>(p.dq + off) = make_float2(a, b);
}

// A warp's 16 fragment rows (the heads of query qa and, with pairs, qa + 1, for KV head g): Q and dO as A
// fragments, and per thread the lse (log2 units; +inf for padding rows and rows without keys, so their P is 0)
// and delta of its two rows (lane / 4 and lane / 4 + 8).
template <int D>
struct BwdRows {
  uint32_t qf[D / 16][4], dof[D / 16][4];
  float lse0, lse1, delta0, delta1;
};

// Loads the rows into r and their Q / dO rows into the swizzled [16][D] tiles q_s / do_s (the B operand of dK
// and dV), the copy spread over kLanes threads (a warp, or the CTA: callers sync before the tiles are read).
template <int D, int kLanes>
__device__ __forceinline__ void load_bwd_rows(BwdRows<D>& r, uint8_t* q_s, uint8_t* do_s, const BwdParams& p, int qa,
                                              bool has_b, int g) {
  constexpr int kChunks = D / 8, kRowBytes = 2 * D;
  load_row_fragments<D>(r.qf, p.q, p.q_stride, qa, has_b, p.ix.pair, p.group, g);
  load_row_fragments<D>(r.dof, p.dout, p.do_stride, qa, has_b, p.ix.pair, p.group, g);
  for (int e = threadIdx.x % kLanes; e < 16 * kChunks; e += kLanes) {
    const int row = e / kChunks, c = e % kChunks;
    const RowMap m = fragment_row(row, qa, has_b, p.ix.pair, p.group);
    uint4 qv = make_uint4(0, 0, 0, 0), dv = qv;
    if (m.head >= 0) {
      const int64_t h = static_cast<int64_t>(g) * p.group + m.head;
      qv = *reinterpret_cast<const uint4*>(p.q + m.query * p.q_stride + h * D + c * 8);
      dv = *reinterpret_cast<const uint4*>(p.dout + m.query * p.do_stride + h * D + c * 8);
    }
    *reinterpret_cast<uint4*>(q_s + row * kRowBytes + swizzle(row, c) * 16) = qv;
    *reinterpret_cast<uint4*>(do_s + row * kRowBytes + swizzle(row, c) * 16) = dv;
  }
  const int hq = p.heads_kv * p.group, r0 = (threadIdx.x % 32) / 4;
  auto stat = [&](const float* x, int row, float none) {
    const RowMap m = fragment_row(row, qa, has_b, p.ix.pair, p.group);
    return m.head < 0 ? none : x[static_cast<int64_t>(m.query) * hq + g * p.group + m.head];
  };
  const float l0 = stat(p.lse, r0, INFINITY), l1 = stat(p.lse, r0 + 8, INFINITY);
  r.lse0 = l0 == -INFINITY ? INFINITY : l0 * 1.4426950408889634f;
  r.lse1 = l1 == -INFINITY ? INFINITY : l1 * 1.4426950408889634f;
  r.delta0 = stat(p.delta, r0, 0.f);
  r.delta1 = stat(p.delta, r0 + 8, 0.f);
}

// The first half of one backward step of a warp's rows over work-list tile t (K tile ks, V tile vs): dq += dS K,
// and P and dS (bf16) into the warp's [16][16] scratch tiles p_s / ds_s, rows x keys, for the key-major products.
template <int D>
__device__ __forceinline__ void tile_scores(float (&dq)[D / 8][4], const BwdRows<D>& r, const uint8_t* ks,
                                            const uint8_t* vs, __nv_bfloat16* p_s, __nv_bfloat16* ds_s,
                                            const int* work, int count_work, int t, float scale, float scale_log2) {
  const int lane = threadIdx.x % 32, r0 = lane / 4, r1 = r0 + 8, cq = (lane % 4) * 2;
  // S = Q K^T and dP = dO V^T for keys 0-7 ([0]) and 8-15 ([1]).
  float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  float dp[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  rows_times_tile_t<D>(s, r.qf, ks);
  rows_times_tile_t<D>(dp, r.dof, vs);
  // P and dS (scale folded in), zero where a row does not see the key.
  float pr[2][4], dsr[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      bool lo, hi;
      slot_visibility(work, count_work, t * kTile + nt * 8 + cq + j, lo, hi);
      pr[nt][j] = lo ? fast_exp2(s[nt][j] * scale_log2 - r.lse0) : 0.f;
      pr[nt][2 + j] = hi ? fast_exp2(s[nt][2 + j] * scale_log2 - r.lse1) : 0.f;
      dsr[nt][j] = pr[nt][j] * (dp[nt][j] - r.delta0) * scale;
      dsr[nt][2 + j] = pr[nt][2 + j] * (dp[nt][2 + j] - r.delta1) * scale;
    }
  }
  uint32_t dsa[4];
  accumulators_to_a(dsa, dsr);
  fragment_times_tile<D>(dq, dsa, ks);  // dQ += dS K (K read transposed, as V is in the forward)
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    *reinterpret_cast<uint32_t*>(p_s + r0 * 16 + nt * 8 + cq) = pack_bf16x2(pr[nt][0], pr[nt][1]);
    *reinterpret_cast<uint32_t*>(p_s + r1 * 16 + nt * 8 + cq) = pack_bf16x2(pr[nt][2], pr[nt][3]);
    *reinterpret_cast<uint32_t*>(ds_s + r0 * 16 + nt * 8 + cq) = pack_bf16x2(dsr[nt][0], dsr[nt][1]);
    *reinterpret_cast<uint32_t*>(ds_s + r1 * 16 + nt * 8 + cq) = pack_bf16x2(dsr[nt][2], dsr[nt][3]);
  }
}

// A scratch tile [16 rows][16 keys] read transposed (keys x rows) as an mma A fragment.
__device__ __forceinline__ void scratch_transposed(uint32_t (&a)[4], const __nv_bfloat16* scratch) {
  const int lane = threadIdx.x % 32, mi = lane / 8, row = (mi >> 1) * 8 + lane % 8, col = (mi & 1) * 8;
  ldmatrix_x4_trans(a, scratch + row * 16 + col);
}

// Hands the two 8-column n-tiles c[0], c[1] (dims dn * 8 ..) of a keys x D accumulator to
// emit(which, col, a0, a1, b0, b1): (a0, a1) are dims col, col + 1 of tile key lane / 4, (b0, b1) the same dims
// of tile key lane / 4 + 8.
template <typename Emit>
__device__ __forceinline__ void emit_key_rows(Emit&& emit, int which, int dn, const float (&c)[2][4]) {
  const int cq = (threadIdx.x % 4) * 2;
#pragma unroll
  for (int h = 0; h < 2; ++h) emit(which, (dn + h) * 8 + cq, c[h][0], c[h][1], c[h][2], c[h][3]);
}

// The second half, for one warp's own rows: dV[key] += P^T dO and dK[key] += dS^T Q for the tile's 16 keys,
// handed to emit as in emit_key_rows (which 0 = dV, 1 = dK); q_s / do_s: the rows' swizzled [16][D] tiles.
template <int D, typename Emit>
__device__ __forceinline__ void key_products(const __nv_bfloat16* p_s, const __nv_bfloat16* ds_s,
                                             const uint8_t* q_s, const uint8_t* do_s, Emit&& emit) {
  uint32_t pt[4], dst[4];
  scratch_transposed(pt, p_s);
  scratch_transposed(dst, ds_s);
  auto products = [&](int which, const uint32_t (&a)[4], const uint8_t* rows) {
#pragma unroll
    for (int dn = 0; dn < D / 8; dn += 2) {
      float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      fragment_times_tile_pair<D>(c[0], c[1], a, rows, dn);
      emit_key_rows(emit, which, dn, c);
    }
  };
  products(0, pt, do_s);
  products(1, dst, q_s);
}

// The block backward kernel (sparse_attention_bwd_blocks.cu): one CTA per (16 queries, KV head) over `plan`;
// accumulates into p.dk / p.dv (atomics) and writes p.dq (each row has one owner). d: head dim, 64 or 128.
void launch_bwd_blocks(const BwdParams& p, const BlockPlan& plan, int d, cudaStream_t stream);

}  // namespace sparse_attention
}  // namespace keye
