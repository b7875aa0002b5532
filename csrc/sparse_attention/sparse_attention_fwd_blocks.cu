// Top-k sparse GQA attention forward over blocks of 16 adjacent queries (used for prefill when queries pair up,
// G = Hq / Hkv <= 8, and one split covers the index lists).
//
// One CTA per (block of 16 queries, KV head); warp w owns the 16 MMA rows of query pair w (the G heads of each
// query) for the whole kernel, so no cross-warp merge is needed. Two phases over the block plan (block_plan.h):
//  1. common rows (selected by all 16 queries): the whole CTA gathers each 32-key stage once into a shared ring
//     (cp.async, 8 stages) and every warp attends to it in one softmax step: one gather serves 16 queries instead
//     of 2. At D = 128 both products run on wgmma, each warpgroup's four pairs (64 rows) as one product
//     (fwd_tile.cuh; realistic 32K forward 10.1 -> 8.0 ms, NOTES.md); D = 64 keeps the per-warp mma.sync tiles;
//  2. each warp walks its pair's remaining rows with its own 3-stage cp.async ring, as the pair kernel does.
// The online softmax state (SoftmaxRows) carries from phase 1 into phase 2.
#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "common/bulk_copy.cuh"
#include "common/check.h"
#include "sparse_attention/fwd_tile.cuh"

namespace keye {
namespace sparse_attention {
namespace {

constexpr int kPairStages = 3;       // per-warp ring depth in phase 2
constexpr int kCommonTiles = 2;      // 16-key tiles per CTA-wide stage in phase 1 (one barrier per 32 keys)
constexpr int kCommonStages = 8;     // CTA-wide ring depth in phase 1 (D = 128: 6 stages, 96 KB, in flight; 10 or 12
                                     // slots measured no faster, NOTES.md; D = 64: 7 stages)

template <int D>
struct BlockLayout {
  static constexpr int kStageBytes = Layout<D>::kStageBytes;
  static constexpr int kCommonStageBytes = kCommonTiles * kStageBytes;
  static constexpr int kPairRingBytes = kBlockWarps * kPairStages * kStageBytes;
  static constexpr int kCommonRingBytes = kCommonStages * kCommonStageBytes;
  // + 1024 at D = 128: its common ring starts at the first 1024-aligned byte (the wgmma swizzle's alignment)
  static constexpr int kBytes =
      (kPairRingBytes > kCommonRingBytes ? kPairRingBytes : kCommonRingBytes) + (D == 128 ? 1024 : 0);
};

template <int D>
__global__ void __launch_bounds__(kBlockThreads, 1) sparse_attention_fwd_blocks_kernel(const FwdParams p,
                                                                                     const BlockPlan plan) {
  using L = BlockLayout<D>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int block = blockIdx.x, g = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t qa = static_cast<int64_t>(block) * kBlockQueries + 2 * warp;
  const bool active = qa < p.ix.num_queries, has_b = qa + 1 < p.ix.num_queries;
  uint32_t qf[D / 16][4] = {};
  if (active) load_row_fragments<D>(qf, p.q, p.q_stride, static_cast<int>(qa), has_b, 2, p.group, g);
  SoftmaxRows<D> st;
  st.init();

  // Phase 1: the common rows, one CTA-wide gather per stage.
  const int* common = plan.common + static_cast<int64_t>(block) * plan.num_idx;
  const int n_common = plan.common_len[block];
  const int common_tiles = (n_common + kTile - 1) / kTile;
  const int stages = (common_tiles + kCommonTiles - 1) / kCommonTiles;
  static_assert(kCommonTiles == 2, "phase 1 attends to a stage's two tiles in one softmax step");
  // The stage's two tiles' entries, loaded a stage ahead.
  int entry_next[2] = {tile_entry(common, n_common, 0), tile_entry(common, n_common, 1)};
  if constexpr (D == 128) {
    // Both products on wgmma, the CTA's two warpgroups each over its four pairs' 64 rows; the ring in the
    // 128-byte-swizzled layout wgmma reads, from the first 1024-aligned byte. One barrier per stage: stage `it`
    // refills the slot of stage it - 2, whose P V product every warpgroup waited for (with its S product of stage
    // it - 1) before arriving here; the P V of stage `it` runs on while the next stage's copies are waited for.
    static_assert(kWgKeys == kCommonTiles * kTile && kWgStageBytes == L::kCommonStageBytes, "one stage, two tiles");
    constexpr int kAhead = kCommonStages - 2;  // stages in flight
    uint8_t* ring = smem + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(smem)) & 1023)) & 1023);
    auto issue_common = [&](int it) {
      gather_stage_wgmma<kBlockThreads>(ring + (it % kCommonStages) * kWgStageBytes, common, n_common, it, p.k,
                                        p.k_stride, p.v, p.v_stride, g);
    };
    prime_ring<kAhead + 1>(stages, issue_common);
    for (int it = 0; it < stages; ++it) {
      cp_async_wait_group<kAhead - 1>();
      fence_async_shared();  // this thread's copies (generic proxy) before wgmma reads them (async proxy)
      __syncthreads();       // every thread's part of stage `it` has landed; stage it - 2's slot is free
      if (it + kAhead < stages) issue_common(it + kAhead);
      cp_async_commit();
      const int entry[2] = {entry_next[0], entry_next[1]};
      entry_next[0] = tile_entry(common, n_common, 2 * it + 2);
      entry_next[1] = tile_entry(common, n_common, 2 * it + 3);
      // Slots past the list were zero-filled and score -inf, so a last, odd tile needs no special case here.
      attend_stage_wgmma(st, qf, ring + (it % kCommonStages) * kWgStageBytes, entry, p.scale_log2);
    }
    wgmma_wait<0>();
    fence_operands(st.acc);
  } else {
    auto issue_common = [&](int it) {
      uint8_t* dst = smem + (it % kCommonStages) * L::kCommonStageBytes;
      gather_stage<D, kBlockThreads, kCommonTiles>(dst, common, n_common, it, p.k, p.k_stride, p.v, p.v_stride, g);
    };
    prime_ring<kCommonStages>(stages, issue_common);
    for (int it = 0; it < stages; ++it) {
      if (it + kCommonStages - 1 < stages) issue_common(it + kCommonStages - 1);
      cp_async_commit();
      cp_async_wait_group<kCommonStages - 1>();
      __syncthreads();  // every thread's part of stage `it` has landed
      const uint8_t* base = smem + (it % kCommonStages) * L::kCommonStageBytes;
      const int entry[2] = {entry_next[0], entry_next[1]};
      entry_next[0] = tile_entry(common, n_common, 2 * it + 2);
      entry_next[1] = tile_entry(common, n_common, 2 * it + 3);
      const uint8_t* const ks[2] = {base, base + L::kStageBytes};
      const uint8_t* const vs[2] = {base + Layout<D>::kTileBytes, base + L::kStageBytes + Layout<D>::kTileBytes};
      // A last, odd tile goes alone: the stage's second tile was not gathered (stale shared memory; P = 0 times a
      // NaN pattern there would still poison O).
      if (2 * it + 1 < common_tiles) attend_tiles<D, 2>(st, qf, ks, vs, entry, p.scale_log2);
      else attend_tile<D>(st, qf, ks[0], vs[0], entry[0], p.scale_log2);
      __syncthreads();  // every warp is done with the stage before it is refilled
    }
  }
  cp_async_wait_all();
  __syncthreads();  // the common ring becomes the per-warp rings

  // Phase 2: the pair's remaining rows (query a's in tile slots 0-7, b's in 8-15), per warp. The tile entries
  // travel in registers: tile t's (visibility), t + 1's, t + 2's (gathered this iteration) and t + 3's (loading).
  static_assert(kPairStages == 3, "the entry registers below follow a 3-stage ring");
  const int64_t pair = static_cast<int64_t>(block) * kBlockPairs + warp;
  const int* work = plan.pair_work + pair * pair_stride(plan.num_idx);
  const int count = active ? plan.pair_len[pair] : 0;
  const int tiles = (count + kTile - 1) / kTile;
  uint8_t* ring = smem + warp * kPairStages * L::kStageBytes;
  auto issue = [&](int t, int entry) {
    gather_tile_entries<D>(ring + (t % kPairStages) * L::kStageBytes, entry, p.k, p.k_stride, p.v, p.v_stride, g);
  };
  int e0 = tile_entry(work, count, 0), e1 = tile_entry(work, count, 1), e2 = tile_entry(work, count, 2);
  if (tiles > 0) issue(0, e0);
  cp_async_commit();
  if (tiles > 1) issue(1, e1);
  cp_async_commit();
  for (int t = 0; t < tiles; ++t) {
    if (t + 2 < tiles) issue(t + 2, e2);
    cp_async_commit();
    const int e3 = tile_entry(work, count, t + 3);
    cp_async_wait_group<kPairStages - 1>();
    __syncwarp();
    const uint8_t* ks = ring + (t % kPairStages) * L::kStageBytes;
    attend_tile<D>(st, qf, ks, ks + Layout<D>::kTileBytes, e0, p.scale_log2);
    __syncwarp();  // every lane is done with this stage before it is refilled
    e0 = e1, e1 = e2, e2 = e3;
  }
  cp_async_wait_all();
  if (!active) return;

  // Each warp normalises and writes its own rows.
  const int hq = p.heads_kv * p.group, cq = (lane % 4) * 2;
  const float l[2] = {quad_sum(st.l0), quad_sum(st.l1)}, m[2] = {st.m0, st.m1};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const RowMap rm = fragment_row(lane / 4 + 8 * h, static_cast<int>(qa), has_b, 2, p.group);
    if (rm.head < 0) continue;
    const int64_t row = static_cast<int64_t>(rm.query) * hq + g * p.group + rm.head;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<uint32_t*>(p.o + row * D + dn * 8 + cq) =
          pack_bf16x2(st.acc[dn][2 * h] * inv, st.acc[dn][2 * h + 1] * inv);
    if (lane % 4 == 0) p.lse[row] = l[h] > 0.f ? (m[h] + log2f(l[h])) * 0.69314718055994531f : -INFINITY;
  }
}

}  // namespace

void launch_fwd_blocks(const FwdParams& p, const BlockPlan& plan, int d, cudaStream_t stream) {
  if (d == 64)
    launch_over_blocks(sparse_attention_fwd_blocks_kernel<64>, p, plan, kBlockThreads, BlockLayout<64>::kBytes, stream);
  else
    launch_over_blocks(sparse_attention_fwd_blocks_kernel<128>, p, plan, kBlockThreads, BlockLayout<128>::kBytes,
                       stream);
}

}  // namespace sparse_attention
}  // namespace keye
