// Top-k sparse GQA attention backward over blocks of 16 adjacent queries (used when queries pair up,
// G = Hq / Hkv <= 8, and one split covers the index lists), the backward of sparse_attention_fwd_blocks.cu.
//
// One CTA per (block of 16 queries, KV head); warp w owns the 16 fragment rows of query pair w for the whole
// kernel, so its dQ needs no merge and is stored, not added. Two phases over the block plan (block_plan.h):
//  1. common rows (selected by all 16 queries): the whole CTA gathers each 32-key stage once into a shared ring;
//     per 16-key tile every warp computes its rows' P and dS (tile_scores), then, after one barrier, warp w
//     computes 16 of the tile's 2 x D dK / dV columns over all 128 rows of the block (P^T dO and dS^T Q with
//     K = 128: as many mma as each warp doing its own 16 rows) and adds them to global memory: one gather and one
//     atomic per element per 16 queries instead of per pair. (The first version summed the warps' rows
//     with shared-memory atomics: 1.6x slower than the pair kernel, whatever the pattern.)
//  2. each warp walks its pair's remaining rows with its own cp.async ring, global atomics as the pair kernel.
#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "common/check.h"
#include "sparse_attention/bwd_tile.cuh"

namespace keye {
namespace sparse_attention {
namespace {

constexpr int kPairStages = 2;    // per-warp ring depth in phase 2
constexpr int kCommonTiles = 2;   // 16-key tiles per CTA-wide stage in phase 1
constexpr int kCommonStages = 4;  // CTA-wide ring depth in phase 1

template <int D>
struct BwdBlockLayout {
  static constexpr int kRowBytes = 2 * D;
  static constexpr int kTileBytes = kTile * kRowBytes;
  static constexpr int kStageBytes = 2 * kTileBytes;        // K then V of one tile
  // Per warp: its Q and dO rows, then two buffers of P / dS scratch tiles (tile t uses buffer t % 2, so a warp
  // can write tile t + 1's while the others still read tile t's).
  static constexpr int kWarpRowsBytes = 2 * 16 * kRowBytes;
  static constexpr int kScratchBytes = 2 * 16 * 16 * 2;  // P then dS, [16][16] bf16
  static constexpr int kScratchOffset = kBlockWarps * kWarpRowsBytes;
  static constexpr int kRingOffset = kScratchOffset + 2 * kBlockWarps * kScratchBytes;
  // Phase 1: the common ring; phase 2: the per-warp rings, in the same bytes.
  static constexpr int kPhase1Bytes = kCommonStages * kCommonTiles * kStageBytes;
  static constexpr int kPhase2Bytes = kBlockWarps * kPairStages * kStageBytes;
  static constexpr int kBytes = kRingOffset + (kPhase1Bytes > kPhase2Bytes ? kPhase1Bytes : kPhase2Bytes);
};

template <int D>
__global__ void __launch_bounds__(kBlockThreads, 1) sparse_attention_bwd_blocks_kernel(const BwdParams p,
                                                                                     const BlockPlan plan) {
  using L = BwdBlockLayout<D>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int block = blockIdx.x, g = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r0 = lane / 4, r1 = r0 + 8, cq = (lane % 4) * 2;
  const GradScales sc = grad_scales(p);
  const int64_t qa = static_cast<int64_t>(block) * kBlockQueries + 2 * warp;
  const bool active = qa < p.ix.num_queries, has_b = qa + 1 < p.ix.num_queries;
  uint8_t* q_s = smem + warp * L::kWarpRowsBytes;
  uint8_t* do_s = q_s + 16 * L::kRowBytes;
  // Scratch buffer b of warp w: P at scratch(b, w), dS 256 elements after it.
  auto scratch = [&](int b, int w) {
    return reinterpret_cast<__nv_bfloat16*>(smem + L::kScratchOffset + (b * kBlockWarps + w) * L::kScratchBytes);
  };

  BwdRows<D> rows;
  if (active) {
    load_bwd_rows<D, 32>(rows, q_s, do_s, p, static_cast<int>(qa), has_b, g);
  } else {  // no rows: P = 0 everywhere, so the warp adds nothing (it still takes part in the CTA's barriers)
    for (int e = lane; e < 2 * 16 * D / 8; e += 32) reinterpret_cast<uint4*>(q_s)[e] = make_uint4(0, 0, 0, 0);
    for (int kk = 0; kk < D / 16; ++kk)
      for (int j = 0; j < 4; ++j) rows.qf[kk][j] = rows.dof[kk][j] = 0u;
    rows.lse0 = rows.lse1 = INFINITY;
    rows.delta0 = rows.delta1 = 0.f;
  }
  float dq[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) dq[dn][0] = dq[dn][1] = dq[dn][2] = dq[dn][3] = 0.f;

  // Phase 1: the common rows, one CTA-wide gather per stage, dK / dV summed over the block by the tensor cores.
  const int* common = plan.common + static_cast<int64_t>(block) * plan.num_idx;
  const int n_common = plan.common_len[block];
  const int common_tiles = (n_common + kTile - 1) / kTile;
  const int stages = (common_tiles + kCommonTiles - 1) / kCommonTiles;
  uint8_t* common_ring = smem + L::kRingOffset;
  int ge[kCommonTiles][kTileChunksPerLane<D, kBlockThreads>];  // the next stage's entries, loaded a stage early
  auto issue_common = [&](int it) {
    uint8_t* dst = common_ring + (it % kCommonStages) * kCommonTiles * L::kStageBytes;
    gather_stage<D, kBlockThreads, kCommonTiles>(dst, ge, n_common, it, p.k, p.k_stride, p.v, p.v_stride, g);
  };
  prime_ring<kCommonStages>(stages, [&](int it) {
    stage_entries<D, kBlockThreads, kCommonTiles>(ge, common, n_common, it);
    issue_common(it);
  });
  stage_entries<D, kBlockThreads, kCommonTiles>(ge, common, n_common, kCommonStages - 1);
  for (int it = 0; it < stages; ++it) {
    // Refills the slot stage it - 1 used: every warp finished reading it before the last tile barrier.
    if (it + kCommonStages - 1 < stages) issue_common(it + kCommonStages - 1);
    cp_async_commit();
    stage_entries<D, kBlockThreads, kCommonTiles>(ge, common, n_common, it + kCommonStages);
    cp_async_wait_group<kCommonStages - 1>();
    __syncthreads();  // stage `it` has landed for every thread
    const uint8_t* base = common_ring + (it % kCommonStages) * kCommonTiles * L::kStageBytes;
#pragma unroll
    for (int j = 0; j < kCommonTiles; ++j) {
      const int t = it * kCommonTiles + j;
      if (t >= common_tiles) continue;  // the same for the whole CTA
      const uint8_t* ks = base + j * L::kStageBytes;
      __nv_bfloat16* mine = scratch(t % 2, warp);
      tile_scores<D>(dq, rows, ks, ks + L::kTileBytes, mine, mine + 256, common, n_common, t, p.scale,
                     p.scale_log2);
      __syncthreads();  // every warp's P / dS of tile t is in its scratch (and tile t - 1's products are done)
      const int e0 = t * kTile + r0 < n_common ? common[t * kTile + r0] : -1;
      const int e1 = t * kTile + r1 < n_common ? common[t * kTile + r1] : -1;
      const int64_t row0 = (static_cast<int64_t>(e0 & kRowMask) * p.heads_kv + g) * D;
      const int64_t row1 = (static_cast<int64_t>(e1 & kRowMask) * p.heads_kv + g) * D;
      // Column slices of 16 over dV then dK (2 D / 16 of them), spread over the warps.
      for (int slice = warp; slice < 2 * D / 16; slice += kBlockWarps) {
        const int which = slice / (D / 16), dn = 2 * (slice % (D / 16));
        float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int w = 0; w < kBlockWarps; ++w) {
          uint32_t a[4];
          scratch_transposed(a, scratch(t % 2, w) + which * 256);
          const uint8_t* rows_w = smem + w * L::kWarpRowsBytes + (which ? 0 : 16 * L::kRowBytes);  // Q or dO
          fragment_times_tile_pair<D>(c[0], c[1], a, rows_w, dn);
        }
        emit_key_rows([&](int wh, int col, float a0, float a1, float b0, float b1) {
          add_key_grads(p, sc, wh, row0 + col, e0 >= 0, a0, a1, row1 + col, e1 >= 0, b0, b1);
        }, which, dn, c);
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();  // the common ring becomes the per-warp rings

  // Phase 2: the pair's remaining rows (tiles of query a's rows alternating with tiles of b's), per warp, each tile
  // over the pair's 16 fragment rows (the other query's half masked by the seen bits).
  const int64_t pair = static_cast<int64_t>(block) * kBlockPairs + warp;
  const int* work = plan.pair_work + pair * pair_stride(plan.num_idx);
  const int count = active ? plan.pair_len[pair] : 0;
  const int tiles = (count + kTile - 1) / kTile;
  uint8_t* ring = smem + L::kRingOffset + warp * kPairStages * L::kStageBytes;
  // Tile t + kPairStages - 1's entries (tile_entry) load an iteration before its gather is issued.
  auto issue = [&](int t, int entry) {
    gather_tile_entries<D>(ring + (t % kPairStages) * L::kStageBytes, entry, p.k, p.k_stride, p.v, p.v_stride, g);
  };
  prime_ring<kPairStages>(tiles, [&](int t) { issue(t, tile_entry(work, count, t)); });
  int next = tile_entry(work, count, kPairStages - 1);
  for (int t = 0; t < tiles; ++t) {
    if (t + kPairStages - 1 < tiles) issue(t + kPairStages - 1, next);
    cp_async_commit();
    next = tile_entry(work, count, t + kPairStages);
    cp_async_wait_group<kPairStages - 1>();
    __syncwarp();
    const uint8_t* ks = ring + (t % kPairStages) * L::kStageBytes;
    const int e0 = t * kTile + r0 < count ? work[t * kTile + r0] : -1;
    const int e1 = t * kTile + r1 < count ? work[t * kTile + r1] : -1;
    const int64_t row0 = (static_cast<int64_t>(e0 & kRowMask) * p.heads_kv + g) * D;
    const int64_t row1 = (static_cast<int64_t>(e1 & kRowMask) * p.heads_kv + g) * D;
    __nv_bfloat16* mine = scratch(0, warp);
    tile_scores<D>(dq, rows, ks, ks + L::kTileBytes, mine, mine + 256, work, count, t, p.scale, p.scale_log2);
    __syncwarp();
    key_products<D>(mine, mine + 256, q_s, do_s, [&](int which, int col, float a0, float a1, float b0, float b1) {
      add_key_grads(p, sc, which, row0 + col, e0 >= 0, a0, a1, row1 + col, e1 >= 0, b0, b1);
    });
    __syncwarp();  // every lane is done with this stage and the scratch tiles before they are refilled
  }
  cp_async_wait_all();
  if (!active) return;

  // dQ: this warp is the only writer of its rows (one KV head per CTA, one CTA per block).
  const int hq = p.heads_kv * p.group;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const RowMap rm = fragment_row(lane / 4 + 8 * h, static_cast<int>(qa), has_b, 2, p.group);
    if (rm.head < 0) continue;
    const int64_t out = (static_cast<int64_t>(rm.query) * hq + g * p.group + rm.head) * D + cq;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) store_query_grad(p, sc, out + dn * 8, dq[dn][2 * h], dq[dn][2 * h + 1]);
  }
}

}  // namespace

void launch_bwd_blocks(const BwdParams& p, const BlockPlan& plan, int d, cudaStream_t stream) {
  if (d == 64)
    launch_over_blocks(sparse_attention_bwd_blocks_kernel<64>, p, plan, kBlockThreads, BwdBlockLayout<64>::kBytes,
                       stream);
  else
    launch_over_blocks(sparse_attention_bwd_blocks_kernel<128>, p, plan, kBlockThreads, BwdBlockLayout<128>::kBytes,
                       stream);
}

}  // namespace sparse_attention
}  // namespace keye
