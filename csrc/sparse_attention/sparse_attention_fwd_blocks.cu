// Top-k sparse GQA attention forward over blocks of 16 adjacent queries (used for prefill when queries pair up,
// G = Hq / Hkv <= 8, and one split covers the index lists).
//
// One CTA per (block of 16 queries, KV head); warp w owns the 16 MMA rows of query pair w (the G heads of each
// query) for the whole kernel, so no cross-warp merge is needed. Two phases over the block plan (block_plan.h):
//  1. common rows (selected by all 16 queries): the whole CTA gathers each stage once into a shared cp.async ring
//     and every warp attends to it in one softmax step: one gather serves 16 queries instead of 2. At D = 128 a
//     stage is 64 keys and both products run on wgmma, each warpgroup's four pairs (64 rows) as one product
//     (fwd_tile.cuh; realistic 32K forward 10.1 -> 8.0 ms, NOTES.md); D = 64 keeps 32-key stages of per-warp
//     mma.sync tiles;
//  2. each warp walks its pair's remaining rows with its own 3-stage cp.async ring, a tile of one query's rows at a
//     time, attended to by that query's heads only (S^T = K Q^T and O^T += V^T P^T on m16n8k16; fwd_tile.cuh).
// The online softmax state carries from phase 1 (SoftmaxRows, the pair's 16 heads as rows) into phase 2 (one
// SoftmaxCols per query, heads as columns) through shared memory.
#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "common/bulk_copy.cuh"
#include "common/check.h"
#include "sparse_attention/fwd_tile.cuh"

namespace keye {
namespace sparse_attention {
namespace {

constexpr int kPairStages = 3;       // per-warp ring depth in phase 2
constexpr int kEntrySlots = 4;       // phase 2: tiles of entries prefetched into shared memory per warp
constexpr int kCommonTiles = 2;      // D = 64: 16-key tiles per CTA-wide stage in phase 1 (one barrier per 32 keys)
constexpr int kCommonStages = 8;     // D = 64: CTA-wide ring depth in phase 1 (7 stages in flight)
constexpr int kWgSlots = 6;         // D = 128: ring slots of kWgKeys rows in phase 1 (4 in flight; 7: slower)

template <int D>
struct BlockLayout {
  static constexpr int kStageBytes = Layout<D>::kStageBytes;
  static constexpr int kCommonStageBytes = kCommonTiles * kStageBytes;
  static constexpr int kPairRingBytes = kBlockWarps * kPairStages * kStageBytes;
  // D = 128: the common ring starts at the first 1024-aligned byte (the wgmma swizzle's alignment)
  static constexpr int kCommonRingBytes =
      D == 128 ? kWgSlots * kWgStageBytes + 1024 : kCommonStages * kCommonStageBytes;
  // Phase 2's per-warp ring of prefetched tile entries (kEntrySlots tiles of 16), after the K/V rings.
  static constexpr int kEntryRingBytes = kBlockWarps * kEntrySlots * kTile * 4;
  static constexpr int kPhase2Bytes = kPairRingBytes + kEntryRingBytes;
  static constexpr int kBytes = kPhase2Bytes > kCommonRingBytes ? kPhase2Bytes : kCommonRingBytes;
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
  // A negative scale goes into Q (a sign flip, exact), so every softmax below takes scale >= 0.
  const float scale_log2 = fabsf(p.scale_log2);
  if (p.scale_log2 < 0.f) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) qf[kk][i] ^= 0x80008000u;
  }
  SoftmaxRows<D> st;
  st.init();

  // Phase 1: the common rows, one CTA-wide gather per stage.
  const int* common = plan.common + static_cast<int64_t>(block) * plan.num_idx;
  const int n_common = plan.common_len[block];
  if constexpr (D == 128) {
    // Both products on wgmma, the CTA's two warpgroups each over its four pairs' 64 rows, kWgKeys rows per stage;
    // the ring in the 128-byte-swizzled layout wgmma reads, from the first 1024-aligned byte. Per stage it, in
    // FlashAttention-3's intra-warpgroup order: S of stage it is issued, O is rescaled and P V of stage it - 1
    // issued behind it; once S is done its softmax runs while that P V is on the tensor cores. One barrier per
    // stage, `arrive(j)`: every thread's part of stage j has landed and no warpgroup has a product in flight (each
    // ended its previous stage with a full wait), so the slot of stage j - 2 is free and takes stage j + kAhead.
    constexpr int kAhead = kWgSlots - 2;  // stages in flight
    const int stages = (n_common + kWgKeys - 1) / kWgKeys;
    uint8_t* ring = smem + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(smem)) & 1023)) & 1023);
    auto slot = [&](int it) { return ring + (it % kWgSlots) * kWgStageBytes; };
    auto issue_common = [&](int it, const int (&e)[kWgRows<kBlockThreads>]) {
      gather_stage_wgmma<kBlockThreads>(slot(it), e, p.k, p.k_stride, p.v, p.v_stride, g);
    };
    // This thread's row entries of the first kAhead + 1 stages, all loads in flight at once (one load and its
    // copies per stage waited one L2 round trip per stage; ncu, NOTES.md); then those of the next stage to gather,
    // loaded a stage early. ptxas sank each stage's loads to its copies again (serialising them) until a barrier
    // stood between the loads and the first copies: loads are not moved past one. The first kAhead stages are
    // gathered whether or not the list reaches them (slots past it zero-filled, never attended to).
    int pe[kAhead + 1][kWgRows<kBlockThreads>];
#pragma unroll
    for (int s = 0; s <= kAhead; ++s) stage_entries_wgmma<kBlockThreads>(pe[s], common, n_common, s);
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kAhead; ++s) {
      issue_common(s, pe[s]);
      cp_async_commit();
    }
    int ge[kWgRows<kBlockThreads>];
#pragma unroll
    for (int i = 0; i < kWgRows<kBlockThreads>; ++i) ge[i] = pe[kAhead][i];
    auto arrive = [&](int j) {
      cp_async_wait_group<kAhead - 1>();
      fence_async_shared();  // this thread's copies (generic proxy) before wgmma reads them (async proxy)
      __syncthreads();
      if (j + kAhead < stages) issue_common(j + kAhead, ge);
      cp_async_commit();
      stage_entries_wgmma<kBlockThreads>(ge, common, n_common, j + kAhead + 1);
    };
    auto softmax = [&](int it, float (&d)[kWgKeys / 2], float& a0, float& a1) {
      // Slots past the list (zero-filled) score -inf by position: only a last, partial stage has any.
      const int valid = n_common - it * kWgKeys;
      if (valid >= kWgKeys) stage_softmax_wgmma<false>(st, d, valid, scale_log2, a0, a1);
      else stage_softmax_wgmma<true>(st, d, valid, scale_log2, a0, a1);
    };
    float d[kWgKeys / 2];  // S of the current stage, then its P (fp32)
    float a0 = 1.f, a1 = 1.f;
    if (stages > 0) {
      arrive(0);
      stage_scores_wgmma(d, qf, slot(0));
      wgmma_wait<0>();
      softmax(0, d, a0, a1);
    }
    for (int it = 1; it < stages; ++it) {
      uint32_t pa[kWgTiles][4];  // stage it - 1's P: the register operand of its P V product
      stage_p_fragments(pa, d);
      arrive(it);
      stage_scores_wgmma(d, qf, slot(it));
      stage_pv_wgmma(st, pa, slot(it - 1), a0, a1);
      wgmma_wait<1>();  // S of stage it (P V of stage it - 1 runs on)
      softmax(it, d, a0, a1);
      wgmma_wait<0>();  // P V of stage it - 1: pa and the slot are free
      fence_operands(st.acc);
    }
    if (stages > 0) {
      uint32_t pa[kWgTiles][4];
      stage_p_fragments(pa, d);
      stage_pv_wgmma(st, pa, slot(stages - 1), a0, a1);
    }
    wgmma_wait<0>();
    fence_operands(st.acc);
  } else {
    const int common_tiles = (n_common + kTile - 1) / kTile;
    const int stages = (common_tiles + kCommonTiles - 1) / kCommonTiles;
    static_assert(kCommonTiles == 2, "phase 1 attends to a stage's two tiles in one softmax step");
    // The stage's two tiles' entries, loaded a stage ahead.
    int entry_next[2] = {tile_entry(common, n_common, 0), tile_entry(common, n_common, 1)};
    int ge[kCommonTiles][kTileChunksPerLane<D, kBlockThreads>];  // the next stage's entries, loaded a stage early
    auto issue_common = [&](int it) {
      uint8_t* dst = smem + (it % kCommonStages) * L::kCommonStageBytes;
      gather_stage<D, kBlockThreads, kCommonTiles>(dst, ge, n_common, it, p.k, p.k_stride, p.v, p.v_stride, g);
    };
    prime_ring<kCommonStages>(stages, [&](int it) {
      stage_entries<D, kBlockThreads, kCommonTiles>(ge, common, n_common, it);
      issue_common(it);
    });
    stage_entries<D, kBlockThreads, kCommonTiles>(ge, common, n_common, kCommonStages - 1);
    for (int it = 0; it < stages; ++it) {
      if (it + kCommonStages - 1 < stages) issue_common(it + kCommonStages - 1);
      cp_async_commit();
      stage_entries<D, kBlockThreads, kCommonTiles>(ge, common, n_common, it + kCommonStages);
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
      if (2 * it + 1 < common_tiles) attend_tiles<D, 2>(st, qf, ks, vs, entry, scale_log2);
      else attend_tile<D>(st, qf, ks[0], vs[0], entry[0], scale_log2);
      __syncthreads();  // every warp is done with the stage before it is refilled
    }
  }
  cp_async_wait_all();
  __syncthreads();  // the common ring becomes the per-warp rings

  // Phase 2: the pair's remaining rows, per warp: tiles of query a's rows alternate with tiles of b's, and each tile
  // is attended to by its own query's heads only (attend_own_tile, transposed: the state moves into one SoftmaxCols
  // per query). The tile entries travel in registers: tile t's (empty-slot mask), t + 1's, t + 2's (gathered this
  // iteration) and t + 3's (read from the entry ring below).
  static_assert(kPairStages == 3, "the entry registers below follow a 3-stage ring");
  const int64_t pair = static_cast<int64_t>(block) * kBlockPairs + warp;
  const int* work = plan.pair_work + pair * pair_stride(plan.num_idx);
  const int count = active ? plan.pair_len[pair] : 0;
  const int tiles = (count + kTile - 1) / kTile;
  uint8_t* ring = smem + warp * kPairStages * L::kStageBytes;
  auto issue = [&](int t, int entry) {
    gather_tile_entries<D>(ring + (t % kPairStages) * L::kStageBytes, entry, p.k, p.k_stride, p.v, p.v_stride, g);
  };
  // Tile j's entries (16 ints) are copied by cp.async into this warp's entry ring with tile j - 3's gather, two
  // steps before the step that reads them (into e3) after its wait: loaded into a register one step ahead, the
  // wait for them was the phase's largest stall (ncu, sixteenth session: long scoreboard on the entry register,
  // 24% of the uniform pattern's samples; the plan's loads queue behind the gathers in L2).
  int* entries = reinterpret_cast<int*>(smem + L::kPairRingBytes) + warp * kEntrySlots * kTile;
  auto prefetch_entries = [&](int t) {
    const int slot = t * kTile + lane;
    int* dst = entries + (t % kEntrySlots) * kTile + lane;
    if (lane < kTile) {
      if (slot < count) cp_async4(dst, work + slot, true);
      else *dst = -1;
    }
  };
  int e0 = tile_entry(work, count, 0), e1 = tile_entry(work, count, 1), e2 = tile_entry(work, count, 2);
  if (tiles > 0) issue(0, e0);
  prefetch_entries(3);
  cp_async_commit();
  if (tiles > 1) issue(1, e1);
  prefetch_entries(4);
  cp_async_commit();
  // The third slot (16 D floats: exactly a stage) holds the state's move until tile 2's gather is issued.
  static_assert(16 * D * 4 == L::kStageBytes, "rows_to_cols' scratch is one ring slot");
  SoftmaxCols<D> sa, sb;
  rows_to_cols<D>(st, sa, sb, reinterpret_cast<float*>(ring + 2 * L::kStageBytes));
  uint32_t qt[2][D / 16][2];  // each query's fragment rows as attend_own_tile's B operand (register pairs)
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    qt[0][kk][0] = qf[kk][0], qt[0][kk][1] = qf[kk][2];
    qt[1][kk][0] = qf[kk][1], qt[1][kk][1] = qf[kk][3];
  }
  auto step = [&](SoftmaxCols<D>& sq, const uint32_t (&qq)[D / 16][2], int t) {
    if (t + 2 < tiles) issue(t + 2, e2);
    prefetch_entries(t + 5);
    cp_async_commit();
    cp_async_wait_group<kPairStages - 1>();
    __syncwarp();  // also: tile t + 3's entries, copied two steps ago, are visible to every lane
    const int e3 = entries[((t + 3) % kEntrySlots) * kTile + lane % kTile];
    const uint8_t* ks = ring + (t % kPairStages) * L::kStageBytes;
    // A tile past the shorter list of the pair is all padding: nothing to attend to (the step would be exact no-op).
    if (__any_sync(0xffffffffu, e0 >= 0))
      attend_own_tile<D>(sq, qq, ks, ks + Layout<D>::kTileBytes, e0, scale_log2);
    __syncwarp();  // every lane is done with this stage before it is refilled
    e0 = e1, e1 = e2, e2 = e3;
  };
  for (int t = 0; t < tiles; t += 2) {  // the plan's pair lists are whole (a, b) tile pairs
    step(sa, qt[0], t);
    step(sb, qt[1], t + 1);
  }
  cp_async_wait_all();
  if (!active) return;

  // Each warp normalises and writes its own queries' heads from the transposed state: lane l holds dims
  // 16 mt + l / 4 (and + 8) of heads 2 (l % 4) and + 1.
  const int hq = p.heads_kv * p.group, cq = (lane % 4) * 2, r = lane / 4;
  auto write = [&](const SoftmaxCols<D>& sq, int64_t query) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float l = sq.l[j];
#pragma unroll
      for (int d = 4; d < 32; d *= 2) l += __shfl_xor_sync(0xffffffffu, l, d);
      const int head = cq + j;
      if (head >= p.group) continue;
      const int64_t row = query * hq + g * p.group + head;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      __nv_bfloat16* out = p.o + row * D + r;
#pragma unroll
      for (int mt = 0; mt < D / 16; ++mt) {
        out[16 * mt] = __float2bfloat16_rn(sq.acc[mt][j] * inv);
        out[16 * mt + 8] = __float2bfloat16_rn(sq.acc[mt][2 + j] * inv);
      }
      if (r == 0) p.lse[row] = l > 0.f ? (sq.m[j] + log2f(l)) * 0.69314718055994531f : -INFINITY;
    }
  };
  write(sa, qa);
  if (has_b) write(sb, qa + 1);
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
