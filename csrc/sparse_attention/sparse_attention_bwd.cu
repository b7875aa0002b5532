// Top-k sparse GQA attention backward. Two modes, same kernels: fast (fp32 atomics for dK/dV, so the summation
// order may vary run to run) and deterministic (every addend rounded to int64 fixed point at a power-of-two scale
// and added with integer atomics, whose sums do not depend on arrival order; bwd_tile.cuh).
//
// Two kernels, as the forward: with pairs of queries and one split, blocks of 16 adjacent queries
// (sparse_attention_bwd_blocks.cu: the rows all 16 selected are gathered once and their dK/dV summed over the
// block by the tensor cores before one atomic); otherwise this one. Same CTA shape and work list as the pair forward
// (work_list.cuh): a pair of adjacent queries x one KV head, the work list's 16-key tiles spread over the warps,
// each tile one backward step (bwd_tile.cuh) whose dK/dV rows go to global memory as atomics (add_key_grads; a key
// both queries of the pair selected gets one pre-summed atomic per element instead of two); dQ is merged across the
// warps at the end. (The ring here is primed by hand, not with prime_ring: the helper changed this kernel's SASS.)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "common/ptx.cuh"
#include "sparse_attention/bwd_tile.cuh"
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

template <int D>
__global__ void __launch_bounds__(kThreads, 2) sparse_attention_bwd_kernel(const BwdParams p) {
  using L = BwdLayout<D>;
  extern __shared__ __align__(128) uint8_t smem[];
  int* work = reinterpret_cast<int*>(smem + L::kIdxOffset);
  const int qa = blockIdx.x * p.ix.pair, g = blockIdx.y, split = blockIdx.z;
  const bool has_b = p.ix.pair == 2 && qa + 1 < p.ix.num_queries;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int count_work = stage_work_list(p.ix, work, qa, has_b, split);
  const int r0 = lane / 4, r1 = r0 + 8, cq = (lane % 4) * 2;
  const int hq = p.heads_kv * p.group;
  const GradScales sc = grad_scales(p);

  uint8_t* q_s = smem + L::kQOffset;
  uint8_t* do_s = smem + L::kDoOffset;
  BwdRows<D> rows;
  load_bwd_rows<D, kThreads>(rows, q_s, do_s, p, qa, has_b, g);
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
    const int e0 = t * kTile + r0 < count_work ? work[t * kTile + r0] : -1;
    const int e1 = t * kTile + r1 < count_work ? work[t * kTile + r1] : -1;
    const int64_t row0 = (static_cast<int64_t>(e0 & kRowMask) * p.heads_kv + g) * D;
    const int64_t row1 = (static_cast<int64_t>(e1 & kRowMask) * p.heads_kv + g) * D;
    tile_scores<D>(dq, rows, ks, ks + L::kTileBytes, p_s, ds_s, work, count_work, t, p.scale, p.scale_log2);
    __syncwarp();
    key_products<D>(p_s, ds_s, q_s, do_s, [&](int which, int col, float a0, float a1, float b0, float b1) {
      add_key_grads(p, sc, which, row0 + col, e0 >= 0, a0, a1, row1 + col, e1 >= 0, b0, b1);
    });
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
    add_query_grad(p, sc, (static_cast<int64_t>(m.query) * hq + g * p.group + m.head) * D + d, sum);
  }
}

}  // namespace

void sparse_attention_bwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                               const at::Tensor& indices, const std::optional<at::Tensor>& row_base,
                               const at::Tensor& lse, const at::Tensor& delta, double scale, int64_t splits,
                               const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, bool share_blocks,
                               const std::optional<at::Tensor>& fixed_scale) {
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
  // Fast mode: fp32 accumulators; deterministic mode (fixed_scale given): int64 fixed-point ones.
  const at::ScalarType acc = fixed_scale.has_value() ? at::kLong : at::kFloat;
  check_accumulator(dq, q, {N, Hq, D}, acc, op, "dq");
  check_accumulator(dk, q, {S, Hkv, D}, acc, op, "dk");
  check_accumulator(dv, q, {S, Hkv, D}, acc, op, "dv");
  if (fixed_scale.has_value()) check_fp32(*fixed_scale, q, {3}, op, "fixed_scale");
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
  p.dq = static_cast<float*>(dq.data_ptr());
  p.dk = static_cast<float*>(dk.data_ptr());
  p.dv = static_cast<float*>(dv.data_ptr());
  p.fixed = fixed_scale.has_value() ? fixed_scale->data_ptr<float>() : nullptr;
  if (share_blocks && p.ix.pair == 2 && used_splits == 1 && N > 2 && p.ix.num_idx > 0) {
    BlockPlan plan{};
    const at::Tensor plan_buffers = build_block_plan(p.ix, indices, stream, plan);
    launch_bwd_blocks(p, plan, static_cast<int>(D), stream);
    return;
  }
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
