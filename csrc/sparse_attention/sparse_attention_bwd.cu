// Top-k sparse GQA attention backward, fast mode (fp32 atomics for dK/dV, so summation order may vary run to
// run; the deterministic mode is the chunked PyTorch formula in keye/ops/reference/sparse_attention.py).
//
// Same CTA shape and work list as the forward (work_list.cuh): a pair of adjacent queries x one KV head. Per
// 16-key tile a warp recomputes S = Q K^T and P = exp(S - lse) from the saved lse, then
//   dP = dO V^T,  dS = P (dP - delta) * scale       (delta = rowsum(dO o) - dlse, precomputed)
//   dQ += dS K                                         (registers; merged across warps, then added to dq)
//   dV[key rows] += P^T dO,  dK[key rows] += dS^T Q   (16 keys x D per tile, float2 atomics into fp32)
// P and dS go through a small per-warp shared-memory tile to be read back transposed (ldmatrix.trans) as the A
// operand of the two key-major products; Q and dO are staged once per CTA as the B operand. A key both queries of
// the pair selected gets one pre-summed atomic per element instead of two.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "common/ptx.cuh"
#include "sparse_attention/host_checks.h"
#include "sparse_attention/sparse_attention.h"
#include "sparse_attention/work_list.cuh"

namespace keye {
namespace {

using namespace sparse_attention;

constexpr int kStages = 2;  // cp.async ring depth per warp (the backward holds more registers and smem)

template <int D>
struct BwdLayout {
  static constexpr int kRowBytes = D * 2;
  static constexpr int kTileBytes = kTile * kRowBytes;
  static constexpr int kStageBytes = 2 * kTileBytes;  // K then V
  static constexpr int kRingBytes = kWarps * kStages * kStageBytes;
  static constexpr int kQOffset = kRingBytes;                  // Q [16][D] bf16, swizzled rows
  static constexpr int kDoOffset = kQOffset + 16 * kRowBytes;  // dO [16][D]
  static constexpr int kScratchOffset = kDoOffset + 16 * kRowBytes;  // per warp: P and dS [16][16] bf16
  static constexpr int kIdxOffset = kScratchOffset + kWarps * 2 * 16 * 16 * 2;
  static_assert(kWarps * 16 * D * 4 <= kRingBytes, "the dQ merge reuses the ring");
};

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
  float* dq;  // [N, Hq, D] fp32, zero-initialised
  float* dk;  // [S, Hkv, D] fp32, zero-initialised
  float* dv;
};

__device__ __forceinline__ void add2(float* p, float a, float b) { atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b)); }

template <int D>
__global__ void __launch_bounds__(kThreads, 2) sparse_attention_bwd_kernel(const BwdParams p) {
  using L = BwdLayout<D>;
  constexpr int kChunks = D / 8;
  extern __shared__ __align__(128) uint8_t smem[];
  int* work = reinterpret_cast<int*>(smem + L::kIdxOffset);
  const int qa = blockIdx.x * p.ix.pair, g = blockIdx.y, split = blockIdx.z;
  const bool has_b = p.ix.pair == 2 && qa + 1 < p.ix.num_queries;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int count_work = stage_work_list(p.ix, work, qa, has_b, split);
  const int r0 = lane / 4, r1 = r0 + 8, cq = (lane % 4) * 2;
  const int hq = p.heads_kv * p.group;

  uint32_t qf[D / 16][4], dof[D / 16][4];
  load_row_fragments<D>(qf, p.q, p.q_stride, qa, has_b, p.ix.pair, p.group, g);
  load_row_fragments<D>(dof, p.dout, p.do_stride, qa, has_b, p.ix.pair, p.group, g);
  uint8_t* q_s = smem + L::kQOffset;
  uint8_t* do_s = smem + L::kDoOffset;
  for (int e = threadIdx.x; e < 16 * kChunks; e += kThreads) {
    const int r = e / kChunks, c = e % kChunks;
    const RowMap m = fragment_row(r, qa, has_b, p.ix.pair, p.group);
    uint4 qv = make_uint4(0, 0, 0, 0), dv = qv;
    if (m.head >= 0) {
      const int64_t h = static_cast<int64_t>(g) * p.group + m.head;
      qv = *reinterpret_cast<const uint4*>(p.q + m.query * p.q_stride + h * D + c * 8);
      dv = *reinterpret_cast<const uint4*>(p.dout + m.query * p.do_stride + h * D + c * 8);
    }
    *reinterpret_cast<uint4*>(q_s + r * L::kRowBytes + swizzle(r, c) * 16) = qv;
    *reinterpret_cast<uint4*>(do_s + r * L::kRowBytes + swizzle(r, c) * 16) = dv;
  }
  // Row statistics: lse in log2 units (+inf for a row without keys, so its P is 0) and delta.
  auto stat = [&](const float* x, int r, float none) {
    const RowMap m = fragment_row(r, qa, has_b, p.ix.pair, p.group);
    return m.head < 0 ? none : x[static_cast<int64_t>(m.query) * hq + g * p.group + m.head];
  };
  float lse0 = stat(p.lse, r0, INFINITY), lse1 = stat(p.lse, r1, INFINITY);
  lse0 = lse0 == -INFINITY ? INFINITY : lse0 * 1.4426950408889634f;
  lse1 = lse1 == -INFINITY ? INFINITY : lse1 * 1.4426950408889634f;
  const float delta0 = stat(p.delta, r0, 0.f), delta1 = stat(p.delta, r1, 0.f);
  __syncthreads();

  uint8_t* ring = smem + warp * kStages * L::kStageBytes;
  __nv_bfloat16* p_s = reinterpret_cast<__nv_bfloat16*>(smem + L::kScratchOffset) + warp * 2 * 256;
  __nv_bfloat16* ds_s = p_s + 256;
  const int num_tiles = (count_work + kTile - 1) / kTile;
  const int my_tiles = warp < num_tiles ? (num_tiles - warp + kWarps - 1) / kWarps : 0;
  auto issue = [&](int t, int stage) {
    gather_tile<D>(ring + stage * L::kStageBytes, work, count_work, t, p.k, p.k_stride, p.v, p.v_stride, g);
  };

  float dq[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) dq[dn][0] = dq[dn][1] = dq[dn][2] = dq[dn][3] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < my_tiles) issue(warp + s * kWarps, s);
    cp_async_commit();
  }
  for (int i = 0; i < my_tiles; ++i) {
    if (i + kStages - 1 < my_tiles) issue(warp + (i + kStages - 1) * kWarps, (i + kStages - 1) % kStages);
    cp_async_commit();
    cp_async_wait_group<kStages - 1>();
    __syncwarp();

    const int t = warp + i * kWarps;
    const uint8_t* ks = ring + (i % kStages) * L::kStageBytes;
    const uint8_t* vs = ks + L::kTileBytes;

    // S = Q K^T and dP = dO V^T for keys 0-7 ([0]) and 8-15 ([1]).
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    float dp[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    rows_times_tile_t<D>(s, qf, ks);
    rows_times_tile_t<D>(dp, dof, vs);
    // P and dS (scale folded in), zero where a row does not see the key.
    float pr[2][4], dsr[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        bool lo, hi;
        slot_visibility(work, count_work, t * kTile + nt * 8 + cq + j, lo, hi);
        pr[nt][j] = lo ? exp2f(s[nt][j] * p.scale_log2 - lse0) : 0.f;
        pr[nt][2 + j] = hi ? exp2f(s[nt][2 + j] * p.scale_log2 - lse1) : 0.f;
        dsr[nt][j] = pr[nt][j] * (dp[nt][j] - delta0) * p.scale;
        dsr[nt][2 + j] = pr[nt][2 + j] * (dp[nt][2 + j] - delta1) * p.scale;
      }
    }
    uint32_t dsa[4];
    accumulators_to_a(dsa, dsr);
    fragment_times_tile<D>(dq, dsa, ks);  // dQ += dS K (K read transposed, as V is in the forward)
    // P^T and dS^T as A fragments (keys x rows) via the warp's scratch tiles.
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      *reinterpret_cast<uint32_t*>(p_s + r0 * 16 + nt * 8 + cq) = pack_bf16x2(pr[nt][0], pr[nt][1]);
      *reinterpret_cast<uint32_t*>(p_s + r1 * 16 + nt * 8 + cq) = pack_bf16x2(pr[nt][2], pr[nt][3]);
      *reinterpret_cast<uint32_t*>(ds_s + r0 * 16 + nt * 8 + cq) = pack_bf16x2(dsr[nt][0], dsr[nt][1]);
      *reinterpret_cast<uint32_t*>(ds_s + r1 * 16 + nt * 8 + cq) = pack_bf16x2(dsr[nt][2], dsr[nt][3]);
    }
    __syncwarp();
    uint32_t pt[4], dst[4];
    {
      const int mi = lane / 8, row = (mi >> 1) * 8 + lane % 8, col = (mi & 1) * 8;
      ldmatrix_x4_trans(pt, p_s + row * 16 + col);
      ldmatrix_x4_trans(dst, ds_s + row * 16 + col);
    }
    // dV[key] += P^T dO and dK[key] += dS^T Q for the tile's keys lane/4 and lane/4 + 8.
    const int e0 = t * kTile + r0 < count_work ? work[t * kTile + r0] : -1;
    const int e1 = t * kTile + r1 < count_work ? work[t * kTile + r1] : -1;
    float* dv0 = p.dv + (static_cast<int64_t>(e0 & kRowMask) * p.heads_kv + g) * D + cq;
    float* dv1 = p.dv + (static_cast<int64_t>(e1 & kRowMask) * p.heads_kv + g) * D + cq;
    float* dk0 = p.dk + (static_cast<int64_t>(e0 & kRowMask) * p.heads_kv + g) * D + cq;
    float* dk1 = p.dk + (static_cast<int64_t>(e1 & kRowMask) * p.heads_kv + g) * D + cq;
    auto scatter = [&](const uint32_t (&a)[4], const uint8_t* rows, float* dst0, float* dst1) {
#pragma unroll
      for (int dn = 0; dn < D / 8; dn += 2) {
        float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        fragment_times_tile_pair<D>(c[0], c[1], a, rows, dn);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (e0 >= 0) add2(dst0 + (dn + h) * 8, c[h][0], c[h][1]);
          if (e1 >= 0) add2(dst1 + (dn + h) * 8, c[h][2], c[h][3]);
        }
      }
    };
    scatter(pt, do_s, dv0, dv1);
    scatter(dst, q_s, dk0, dk1);
    __syncwarp();  // the stage and the scratch tiles are free for the next tile
  }
  cp_async_wait_all();
  __syncthreads();  // the ring becomes the dQ merge buffer

  float* qm = reinterpret_cast<float*>(smem);  // [warps][16][D]
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    float* o0 = qm + (warp * 16 + r0) * D + dn * 8 + cq;
    float* o1 = qm + (warp * 16 + r1) * D + dn * 8 + cq;
    o0[0] = dq[dn][0];
    o0[1] = dq[dn][1];
    o1[0] = dq[dn][2];
    o1[1] = dq[dn][3];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < 16 * D; e += kThreads) {
    const int r = e / D, d = e % D;
    const RowMap m = fragment_row(r, qa, has_b, p.ix.pair, p.group);
    if (m.head < 0) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += qm[(w * 16 + r) * D + d];
    atomicAdd(p.dq + (static_cast<int64_t>(m.query) * hq + g * p.group + m.head) * D + d, sum);
  }
}

}  // namespace

void sparse_attention_bwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                               const at::Tensor& indices, const std::optional<at::Tensor>& row_base,
                               const at::Tensor& lse, const at::Tensor& delta, double scale, int64_t splits,
                               const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  const char* op = "sparse_attention_backward";
  int64_t used_splits = 1;
  BwdParams p{};
  p.ix = check_attention_args(op, q, k, v, indices, row_base, splits, /*pair_queries=*/true, used_splits);
  const int64_t N = q.size(0), Hq = q.size(1), D = q.size(2), S = k.size(0), Hkv = k.size(1);
  check_rows_operand(dout, q, op, "dout", "[N, Hq, D]");
  KEYE_CHECK(dout.sizes() == q.sizes(), "keye.", op, ": 'dout' must have the shape of 'q' ", dims_str(q.sizes()),
             ", got ", dims_str(dout.sizes()));
  check_fp32(lse, q, {N, Hq}, op, "lse");
  check_fp32(delta, q, {N, Hq}, op, "delta");
  check_fp32(dq, q, {N, Hq, D}, op, "dq");
  check_fp32(dk, q, {S, Hkv, D}, op, "dk");
  check_fp32(dv, q, {S, Hkv, D}, op, "dv");
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(q.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  p.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  p.k = reinterpret_cast<const __nv_bfloat16*>(k.data_ptr());
  p.v = reinterpret_cast<const __nv_bfloat16*>(v.data_ptr());
  p.dout = reinterpret_cast<const __nv_bfloat16*>(dout.data_ptr());
  p.q_stride = q.stride(0);
  p.k_stride = k.stride(0);
  p.v_stride = v.stride(0);
  p.do_stride = dout.stride(0);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.heads_kv = static_cast<int>(Hkv);
  p.group = static_cast<int>(Hq / Hkv);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  const dim3 grid(static_cast<unsigned>((N + p.ix.pair - 1) / p.ix.pair), static_cast<unsigned>(Hkv),
                  static_cast<unsigned>(used_splits));
  const int smem_idx = 2 * p.ix.chunk * 4;
  if (D == 64) {
    const int smem = BwdLayout<64>::kIdxOffset + smem_idx;
    C10_CUDA_CHECK(cudaFuncSetAttribute(sparse_attention_bwd_kernel<64>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        smem));
    sparse_attention_bwd_kernel<64><<<grid, kThreads, smem, stream>>>(p);
  } else {
    const int smem = BwdLayout<128>::kIdxOffset + smem_idx;
    C10_CUDA_CHECK(cudaFuncSetAttribute(sparse_attention_bwd_kernel<128>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        smem));
    sparse_attention_bwd_kernel<128><<<grid, kThreads, smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace keye
