// Top-k sparse GQA attention forward: the pair kernel (decode, G > 8, several splits, or share_blocks off) and
// the entry point that picks it or the block kernel (sparse_attention_fwd_blocks.cu; prefill).
//
// One CTA per (pair of adjacent query rows, KV head, split), over the pair's work list (work_list.cuh: the
// union of the two index lists when they are sorted). The W warps (4, or 8 when the grid fits in one CTA per SM)
// are independent pipelines over that list: warp w takes the 16-key tiles w, w+W, ..., gathers their K and V rows
// (256 B each at D = 128) with 16-byte cp.async into its own 3-stage ring (zero-filled for empty slots), computes
// S = Q K^T and O += P V on bf16 tensor cores with an online softmax in registers, and at the end the warps merge
// their (max, sum, O) through shared memory. With splits > 1 each split writes a normalised partial O and its
// log-sum-exp, and merge_splits_kernel combines them (decode: few queries, long lists). A CTA of one query with
// G <= 8 heads (decode) takes the own-heads kernel: the same loop with each tile transposed (S^T = K Q^T, the
// query's heads as the MMA's N), so no fragment rows are padding.
//
// Why this shape: with GQA a gathered K/V row serves only G heads of one query (~8 FLOP/byte), so the kernel is
// bound by the gather (about 5.3 TB/s from L2 on the H200), not the tensor cores. Pairing two queries fills the
// 16 MMA rows with real work and, where neighbours share keys, gathers shared rows once.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "common/device.h"
#include "common/ptx.cuh"
#include "sparse_attention/sparse_attention.h"
#include "sparse_attention/host_checks.h"
#include "sparse_attention/fwd_tile.cuh"
#include "sparse_attention/work_list.cuh"

namespace keye {
namespace {

using namespace sparse_attention;

constexpr int kStages = 3;  // cp.async ring depth per warp (4-6 measured no faster for decode: NOTES.md)

// The pair kernel's shared memory (W warps): a 3-stage ring per warp; the cross-warp merge reuses it
// (O [warps][16][D] fp32, then max and sum [warps][16]); the work list follows.
template <int D, int W>
struct PairLayout : Layout<D> {
  static constexpr int kRingBytes = W * kStages * Layout<D>::kStageBytes;
  static constexpr int kMergeBytes = W * 16 * D * 4 + 2 * W * 16 * 4;
  static constexpr int kIdxOffset = kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes;
};

// The end of both kernels: the W warps' states (O [warp][16 rows][D] fp32, max and sum [warp][16], written by the
// caller into the ring's bytes) are merged per fragment row and written out, normalised (o, lse) or as split
// `split`'s partials.
template <int D, int W>
__device__ __forceinline__ void merge_warps_and_write(const FwdParams& p, const float* om, const float* mm,
                                                      const float* lm, int qa, bool has_b, int g, int split) {
  const int hq = p.heads_kv * p.group;
  for (int e = threadIdx.x; e < 16 * D; e += 32 * W) {
    const int r = e / D, d = e % D;
    const RowMap m = fragment_row(r, qa, has_b, p.ix.pair, p.group);
    if (m.head < 0) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < W; ++w) mx = fmaxf(mx, mm[w * 16 + r]);
    float sum = 0.f, out = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float f = exp2f(mm[w * 16 + r] - mx);
        sum += f * lm[w * 16 + r];
        out += f * om[(w * 16 + r) * D + d];
      }
    }
    const bool any = sum > 0.f;
    const float o = any ? out / sum : 0.f;
    const float lse = any ? (mx + log2f(sum)) * 0.69314718055994531f : -INFINITY;
    const int64_t row = static_cast<int64_t>(m.query) * hq + g * p.group + m.head;
    if (p.o_part == nullptr) {
      p.o[row * D + d] = __float2bfloat16_rn(o);
      if (d == 0) p.lse[row] = lse;
    } else {
      const int64_t off = static_cast<int64_t>(split) * p.ix.num_queries * hq;
      p.o_part[(off + row) * D + d] = o;
      if (d == 0) p.lse_part[off + row] = lse;
    }
  }
}

// The tile loop both kernels share: warp w attends to tiles w, w + W, ... of the work list through its own
// kStages-deep ring; attend(ks, vs, entry) is one online-softmax step over a gathered tile.
template <int D, int W, class Attend>
__device__ __forceinline__ void warp_tile_loop(const FwdParams& p, uint8_t* smem, const int* work, int count_work,
                                               int g, Attend&& attend) {
  const int warp = threadIdx.x / 32;
  uint8_t* ring = smem + warp * kStages * Layout<D>::kStageBytes;
  const int num_tiles = (count_work + kTile - 1) / kTile;
  const int my_tiles = warp < num_tiles ? (num_tiles - warp + W - 1) / W : 0;
  auto issue = [&](int t, int stage) {
    gather_tile_entries<D>(ring + stage * Layout<D>::kStageBytes, tile_entry(work, count_work, t), p.k, p.k_stride,
                           p.v, p.v_stride, g);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < my_tiles) issue(warp + s * W, s);
    cp_async_commit();
  }
  for (int i = 0; i < my_tiles; ++i) {
    if (i + kStages - 1 < my_tiles) issue(warp + (i + kStages - 1) * W, (i + kStages - 1) % kStages);
    cp_async_commit();
    cp_async_wait_group<kStages - 1>();
    __syncwarp();
    const uint8_t* ks = ring + (i % kStages) * Layout<D>::kStageBytes;
    attend(ks, ks + Layout<D>::kTileBytes, tile_entry(work, count_work, warp + i * W));
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  cp_async_wait_all();
}

template <int D, int W>
__global__ void __launch_bounds__(32 * W, W == 4 ? 2 : 1) sparse_attention_fwd_kernel(const FwdParams p) {
  using L = PairLayout<D, W>;
  extern __shared__ __align__(128) uint8_t smem[];
  int* work = reinterpret_cast<int*>(smem + L::kIdxOffset);  // [2 * chunk] entries
  const int qa = blockIdx.x * p.ix.pair, g = blockIdx.y, split = blockIdx.z;
  const bool has_b = p.ix.pair == 2 && qa + 1 < p.ix.num_queries;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int count_work = stage_work_list<W>(p.ix, work, qa, has_b, split);
  const int r0 = lane / 4, r1 = r0 + 8, cq = (lane % 4) * 2;
  uint32_t qa_frag[D / 16][4];
  load_row_fragments<D>(qa_frag, p.q, p.q_stride, qa, has_b, p.ix.pair, p.group, g);

  SoftmaxRows<D> st;
  st.init();
  warp_tile_loop<D, W>(p, smem, work, count_work, g, [&](const uint8_t* ks, const uint8_t* vs, int entry) {
    attend_tile<D>(st, qa_frag, ks, vs, entry, p.scale_log2);
  });
  const float l0 = quad_sum(st.l0), l1 = quad_sum(st.l1);
  __syncthreads();  // the ring becomes the merge buffer

  float* om = reinterpret_cast<float*>(smem);  // [warps][16][D]
  float* mm = om + W * 16 * D;                 // [warps][16]
  float* lm = mm + W * 16;                     // [warps][16]
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    float* o0 = om + (warp * 16 + r0) * D + dn * 8 + cq;
    float* o1 = om + (warp * 16 + r1) * D + dn * 8 + cq;
    o0[0] = st.acc[dn][0];
    o0[1] = st.acc[dn][1];
    o1[0] = st.acc[dn][2];
    o1[1] = st.acc[dn][3];
  }
  if (lane % 4 == 0) {
    mm[warp * 16 + r0] = st.m0;
    mm[warp * 16 + r1] = st.m1;
    lm[warp * 16 + r0] = l0;
    lm[warp * 16 + r1] = l1;
  }
  __syncthreads();
  merge_warps_and_write<D, W>(p, om, mm, lm, qa, has_b, g, split);
}

// CTAs of one query whose G <= 8 heads fill only half of attend_tile's 16 fragment rows (decode without pairing):
// the same loop with each tile attended to transposed, S^T = K Q^T over the query's own heads (attend_own_tile),
// half the mma and softmax work per tile.
template <int D, int W>
__global__ void __launch_bounds__(32 * W, W == 4 ? 2 : 1) sparse_attention_fwd_own_kernel(const FwdParams p) {
  using L = PairLayout<D, W>;
  extern __shared__ __align__(128) uint8_t smem[];
  int* work = reinterpret_cast<int*>(smem + L::kIdxOffset);
  const int qa = blockIdx.x, g = blockIdx.y, split = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int count_work = stage_work_list<W>(p.ix, work, qa, false, split);
  uint32_t qf[D / 16][4];
  load_row_fragments<D>(qf, p.q, p.q_stride, qa, false, 1, p.group, g);
  uint32_t qt[D / 16][2];  // fragment rows 0-7 (the query's heads) as attend_own_tile's B operand
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) qt[kk][0] = qf[kk][0], qt[kk][1] = qf[kk][2];

  SoftmaxCols<D> st;
  st.init();
  warp_tile_loop<D, W>(p, smem, work, count_work, g, [&](const uint8_t* ks, const uint8_t* vs, int entry) {
    attend_own_tile<D>(st, qt, ks, vs, entry, p.scale_log2);
  });
  // Head 2 (lane % 4) + j: its sum over the 8 lanes that hold parts of it.
  float l[2] = {st.l[0], st.l[1]};
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int d = 4; d < 32; d *= 2) l[j] += __shfl_xor_sync(0xffffffffu, l[j], d);
  __syncthreads();  // the ring becomes the merge buffer

  float* om = reinterpret_cast<float*>(smem);  // [warps][16][D], rows = heads (0-7 used)
  float* mm = om + W * 16 * D;
  float* lm = mm + W * 16;
  const int r = lane / 4, h0 = (lane % 4) * 2;
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
    for (int c = 0; c < 4; ++c) om[(warp * 16 + h0 + c % 2) * D + 16 * mt + r + 8 * (c / 2)] = st.acc[mt][c];
  if (r == 0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      mm[warp * 16 + h0 + j] = st.m[j];
      lm[warp * 16 + h0 + j] = l[j];
    }
  }
  __syncthreads();
  merge_warps_and_write<D, W>(p, om, mm, lm, qa, false, g, split);
}

// o = sum_s exp(lse_s - lse) o_s with lse = logsumexp_s lse_s; one thread per (query head, dim).
__global__ void merge_splits_kernel(const float* __restrict__ o_part, const float* __restrict__ lse_part, int splits,
                                    int64_t rows, int d, __nv_bfloat16* __restrict__ o, float* __restrict__ lse) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * d) return;
  const int64_t row = e / d;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, lse_part[s * rows + row]);
  float sum = 0.f, out = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float f = __expf(lse_part[s * rows + row] - mx);
      sum += f;
      out += f * o_part[s * rows * d + e];
    }
  }
  o[e] = __float2bfloat16_rn(sum > 0.f ? out / sum : 0.f);
  if (e % d == 0) lse[row] = sum > 0.f ? mx + logf(sum) : -INFINITY;
}

// The pair kernel, or the own-heads kernel for CTAs of one query with G <= 8 heads; 8 warps per CTA when the grid
// fits in one CTA per SM (decode), else 4 (two CTAs per SM). Decode, 128K context, H200, one call per CUDA graph,
// against the 4-warp pair kernel in the same process (NOTES.md, twenty-fourth session): batch 8 26.4 -> 22.9 us,
// batch 32 53.3 -> 48.2 us, batch 128 164.2 -> 162.2 us. 8 warps alone took batch 32 to 49.1 us, the own-heads
// kernel alone (4 warps) to 50.5.
template <int D>
void launch_pair_or_own(const FwdParams& p, dim3 grid, int smem_idx, cudaStream_t stream, int sms) {
  const bool own = p.ix.pair == 1 && p.group <= 8;
  const bool wide = static_cast<int64_t>(grid.x) * grid.y * grid.z <= sms;
  auto go = [&](auto kernel, int ring_and_merge, int warps) {
    const int smem = ring_and_merge + smem_idx;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, 32 * warps, smem, stream>>>(p);
  };
  if (own && wide) return go(sparse_attention_fwd_own_kernel<D, 8>, PairLayout<D, 8>::kIdxOffset, 8);
  if (own) return go(sparse_attention_fwd_own_kernel<D, 4>, PairLayout<D, 4>::kIdxOffset, 4);
  if (wide) return go(sparse_attention_fwd_kernel<D, 8>, PairLayout<D, 8>::kIdxOffset, 8);
  go(sparse_attention_fwd_kernel<D, 4>, PairLayout<D, 4>::kIdxOffset, 4);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& indices,
                                                             const std::optional<at::Tensor>& row_base, double scale,
                                                             int64_t splits, bool pair_queries, bool share_blocks) {
  int64_t used_splits = 1;
  FwdParams p{};
  p.ix = check_attention_args("sparse_attention", q, k, v, indices, row_base, splits, pair_queries, used_splits);
  const int64_t N = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);

  auto o = at::empty({N, Hq, D}, q.options());
  auto lse = at::empty({N, Hq}, q.options().dtype(at::kFloat));
  if (N == 0) return {o, lse};
  const at::cuda::CUDAGuard guard(q.device());
  auto stream = at::cuda::getCurrentCUDAStream();

  p.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  p.q_stride = q.stride(0);
  p.k = reinterpret_cast<const __nv_bfloat16*>(k.data_ptr());
  p.v = reinterpret_cast<const __nv_bfloat16*>(v.data_ptr());
  p.k_stride = k.stride(0);
  p.v_stride = v.stride(0);
  p.heads_kv = static_cast<int>(Hkv);
  p.group = static_cast<int>(Hq / Hkv);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  at::Tensor o_part, lse_part;
  if (used_splits > 1) {
    o_part = at::empty({used_splits, N, Hq, D}, q.options().dtype(at::kFloat));
    lse_part = at::empty({used_splits, N, Hq}, q.options().dtype(at::kFloat));
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  } else {
    p.o = reinterpret_cast<__nv_bfloat16*>(o.data_ptr());
    p.lse = lse.data_ptr<float>();
  }

  if (share_blocks && p.ix.pair == 2 && used_splits == 1 && N > 2 && p.ix.num_idx > 0) {
    BlockPlan plan{};
    const at::Tensor plan_buffers = build_block_plan(p.ix, indices, stream, plan);
    launch_fwd_blocks(p, plan, static_cast<int>(D), stream);
    return {o, lse};
  }

  const dim3 grid(static_cast<unsigned>((N + p.ix.pair - 1) / p.ix.pair), static_cast<unsigned>(Hkv),
                  static_cast<unsigned>(used_splits));
  const int smem_idx = 2 * p.ix.chunk * 4;
  const int sms = sm_count(q.device().index());
  if (D == 64) launch_pair_or_own<64>(p, grid, smem_idx, stream, sms);
  else launch_pair_or_own<128>(p, grid, smem_idx, stream, sms);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (used_splits > 1) {
    const int64_t rows = N * Hq;
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>((rows * D + threads - 1) / threads);
    merge_splits_kernel<<<blocks, threads, 0, stream>>>(p.o_part, p.lse_part, static_cast<int>(used_splits), rows,
                                                        static_cast<int>(D), reinterpret_cast<__nv_bfloat16*>(o.data_ptr()),
                                                        lse.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {o, lse};
}

}  // namespace keye
