// Shared by the sparse-attention forward and backward kernels: the CTA shape, the per-CTA work list (the union
// of two adjacent queries' index lists), Q-like fragment loads, the K/V tile gather and the per-tile MMA steps.
//
// A CTA serves a pair of adjacent query rows and one KV head. The 16 rows of an mma.sync m16n8k16 tile hold the
// G = Hq/Hkv heads of query a (rows 0-7) and of query b (rows 8-15) when G <= 8, or the 16 heads of one query
// when G > 8. When both index lists are sorted (valid rows strictly increasing, empty slots last; what
// indexer_topk_prefill returns), a row both queries selected appears once in the work list, with a mask saying
// which fragment rows see it; unsorted lists are used as they are (correct, nothing shared).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "common/ptx.cuh"

namespace keye {
namespace sparse_attention {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 16;                   // keys per warp tile (the N of one pair of m16n8 MMAs)
constexpr int kMaxChunk = 2048;             // index slots per query one CTA stages in shared memory
// A work-list entry is a K/V row (< 2^29) plus which fragment rows see it: bit 30 rows 0-7, bit 29 rows 8-15.
constexpr int kRowMask = (1 << 29) - 1;
constexpr int kSeenLo = 1 << 30;
constexpr int kSeenHi = 1 << 29;

struct IndexParams {
  const int* idx;  // [N, K]
  int64_t idx_stride;
  int num_idx;          // K: index slots per query
  const int* row_base;  // [N] (added to every valid index) or nullptr
  int64_t num_rows;     // S: rows of k and v
  int64_t num_queries;  // N
  int pair;             // queries per CTA: 2 when G <= 8, else 1
  int chunk;            // index slots per query and split (a multiple of 64, at most kMaxChunk)
};

// 16-byte chunk c of row r of a K or V tile lives at chunk c ^ (r % 8): the 8 rows one ldmatrix reads at the
// same logical chunk hit 8 different bank groups.
__device__ __forceinline__ int swizzle(int row, int chunk) { return chunk ^ (row & 7); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Builds the CTA's work list for split `split` of queries qa (and qa + 1 when has_b) in work[0, 2 * chunk) and
// returns its length. Called by every thread of the CTA (W warps); ends with the list visible to all threads.
template <int W = kWarps>
__device__ inline int stage_work_list(const IndexParams& p, int* work, int qa, bool has_b, int split) {
  constexpr int kSeg = kMaxChunk / (32 * W);  // slots per thread while staging
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int first = split * p.chunk;
  const int count = max(0, min(p.num_idx - first, p.chunk));
  // Thread t owns slots [kSeg t, kSeg (t + 1)) of each list; list a goes to work[0, chunk), b to [chunk, 2 chunk).
  int ea[kSeg], eb[kSeg];
  auto load = [&](int query, int (&e)[kSeg], int* dst) {
    const int* idx = p.idx + query * p.idx_stride + first;
    const int64_t base = p.row_base ? p.row_base[query] : 0;
#pragma unroll
    for (int k = 0; k < kSeg; ++k) {
      const int i = threadIdx.x * kSeg + k;
      const int x = i < count ? idx[i] : -1;
      const int64_t row = base + x;
      e[k] = (x >= 0 && row < p.num_rows) ? static_cast<int>(row) : -1;
      if (i < count) dst[i] = e[k];
    }
  };
  load(qa, ea, work);
  if (!has_b) {
    // One query (decode, G > 8, or the last of an odd count): nothing to share, so no sortedness check, membership
    // walk or scan; the list is used in place, up to its last valid slot (one barrier instead of four).
    const int a_bits = kSeenLo | (p.pair == 1 ? kSeenHi : 0);
    int used = 0;
#pragma unroll
    for (int k = 0; k < kSeg; ++k) {
      const int i = threadIdx.x * kSeg + k;
      if (i < count) work[i] = ea[k] < 0 ? -1 : ea[k] | a_bits;
      if (i < count && ea[k] >= 0) used = i + 1;
    }
#pragma unroll
    for (int d = 16; d > 0; d /= 2) used = max(used, __shfl_xor_sync(0xffffffffu, used, d));
    __shared__ int warp_used[W];
    if (lane == 0) warp_used[warp] = used;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < W; ++w) used = max(used, warp_used[w]);
    return used;
  }
  load(qa + 1, eb, work + p.chunk);
  __syncthreads();

  bool unsorted = false;
#pragma unroll
  for (int k = 0; k < kSeg; ++k) {
    const int i = threadIdx.x * kSeg + k;
    if (i + 1 < count) {
      const int na = k + 1 < kSeg ? ea[k + 1] : work[i + 1];
      const int nb = k + 1 < kSeg ? eb[k + 1] : work[p.chunk + i + 1];
      unsorted |= (ea[k] < 0 && na >= 0) || (ea[k] >= 0 && na >= 0 && na <= ea[k]);
      unsorted |= (eb[k] < 0 && nb >= 0) || (eb[k] >= 0 && nb >= 0 && nb <= eb[k]);
    }
  }
  const bool sorted = !__syncthreads_or(unsorted);

  // With sorted lists, a row of list b that list a also holds is dropped from b and marked seen by both.
  // Membership by a merge walk: one binary search for a thread's first entry, then a few linear steps per entry
  // (a binary search again when the other list runs far ahead).
  uint32_t a_in_b = 0, b_in_a = 0;
  if (sorted) {
    auto lower_bound = [&](const int* list, int lo, unsigned x) {
      int hi = count;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (static_cast<unsigned>(list[mid]) < x) lo = mid + 1;
        else hi = mid;
      }
      return lo;
    };
    auto members = [&](const int (&e)[kSeg], const int* other) {
      uint32_t flags = 0;
      int j = -1;
#pragma unroll
      for (int k = 0; k < kSeg; ++k) {
        if (e[k] < 0) continue;  // sorted: empty slots only at the end
        const unsigned x = static_cast<unsigned>(e[k]);
        if (j < 0) {
          j = lower_bound(other, 0, x);
        } else {
          for (int step = 0; step < 4 && j < count && static_cast<unsigned>(other[j]) < x; ++step) ++j;
          if (j < count && static_cast<unsigned>(other[j]) < x) j = lower_bound(other, j, x);
        }
        if (j < count && other[j] == e[k]) flags |= 1u << k;
      }
      return flags;
    };
    a_in_b = members(ea, work + p.chunk);
    b_in_a = members(eb, work);
  }

  // Work list = list a (sorted: its valid prefix; unsorted: all of its slots) then the kept rows of list b,
  // compacted; offsets from a block scan of (a slots << 16 | kept b rows) per thread.
  int mine = 0;
#pragma unroll
  for (int k = 0; k < kSeg; ++k) {
    const int i = threadIdx.x * kSeg + k;
    mine += ((sorted ? ea[k] >= 0 : i < count) ? 1 << 16 : 0) + ((eb[k] >= 0 && !((b_in_a >> k) & 1u)) ? 1 : 0);
  }
  int incl = mine;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += y;
  }
  __shared__ int warp_sums[W];
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();  // also: every thread is done reading the staged lists
  int before = 0, total = 0;
#pragma unroll
  for (int w = 0; w < W; ++w) {
    before += w < warp ? warp_sums[w] : 0;
    total += warp_sums[w];
  }
  const int excl = before + incl - mine;
  const int a_slots = total >> 16;
  const int a_bits = kSeenLo | (p.pair == 1 ? kSeenHi : 0);
  int ob = a_slots + (excl & 0xffff);
#pragma unroll
  for (int k = 0; k < kSeg; ++k) {
    const int i = threadIdx.x * kSeg + k;
    if (sorted ? ea[k] >= 0 : i < count) work[i] = ea[k] < 0 ? -1 : ea[k] | a_bits | (((a_in_b >> k) & 1u) ? kSeenHi : 0);
    if (eb[k] >= 0 && !((b_in_a >> k) & 1u)) work[ob++] = eb[k] | kSeenHi;
  }
  __syncthreads();
  return a_slots + (total & 0xffff);
}

// Query / head of fragment row r (0-15), or head -1 where the row is padding.
struct RowMap {
  int query, head;
};
__device__ __forceinline__ RowMap fragment_row(int r, int qa, bool has_b, int pair, int group) {
  if (pair == 2) {
    const bool hi = r >= 8;
    const int head = r % 8;
    return {qa + hi, (head < group && (!hi || has_b)) ? head : -1};
  }
  return {qa, r < group ? r : -1};
}

// m16n8k16 A fragments (16 rows x D) of a [N, H, D] bf16 tensor (rows mapped by fragment_row, heads of KV head
// g's group); zero for padding rows.
template <int D>
__device__ __forceinline__ void load_row_fragments(uint32_t (&f)[D / 16][4], const __nv_bfloat16* x, int64_t stride,
                                                   int qa, bool has_b, int pair, int group, int g) {
  const int lane = threadIdx.x % 32;
  const int r0 = lane / 4, cq = (lane % 4) * 2;
  const RowMap m0 = fragment_row(r0, qa, has_b, pair, group), m1 = fragment_row(r0 + 8, qa, has_b, pair, group);
  const __nv_bfloat16* p0 = x + m0.query * stride + (static_cast<int64_t>(g) * group + max(m0.head, 0)) * D;
  const __nv_bfloat16* p1 = x + m1.query * stride + (static_cast<int64_t>(g) * group + max(m1.head, 0)) * D;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int c = kk * 16 + cq;
    f[kk][0] = m0.head >= 0 ? *reinterpret_cast<const uint32_t*>(p0 + c) : 0u;
    f[kk][1] = m1.head >= 0 ? *reinterpret_cast<const uint32_t*>(p1 + c) : 0u;
    f[kk][2] = m0.head >= 0 ? *reinterpret_cast<const uint32_t*>(p0 + c + 8) : 0u;
    f[kk][3] = m1.head >= 0 ? *reinterpret_cast<const uint32_t*>(p1 + c + 8) : 0u;
  }
}

// A warp's copy of work-list tile t in one register: lane l holds the entry of slot t * kTile + l % kTile (-1 past
// the list). Loaded a few tiles ahead, it lets the tile's gather and visibility read entries by shuffle: the
// forward's per-lane loads of the list were its largest stall after fixed-latency dependencies (ncu, NOTES.md).
__device__ __forceinline__ int tile_entry(const int* work, int count_work, int t) {
  const int slot = t * kTile + static_cast<int>(threadIdx.x % kTile);
  return slot < count_work ? work[slot] : -1;
}

// gather_tile for one warp whose tile entries are in `entry` (tile_entry). Each lane copies one fixed 16-byte
// chunk c of every row it touches (rows h, h + R, h + 2R, ... with R = 32 / chunks per row), so the global address
// is this lane's chunk base plus the row offset, each row's entry is shuffled once for its K and V chunk, and the
// swizzled shared offset is a per-lane constant XOR a compile-time one: (i R + h) & 7 = ((i R) & 7) ^ h for h < R.
template <int D>
__device__ __forceinline__ void gather_tile_entries(uint8_t* dst, int entry, const __nv_bfloat16* k, int64_t k_stride,
                                                    const __nv_bfloat16* v, int64_t v_stride, int g) {
  constexpr int kChunks = D / 8, kRowsPerStep = 32 / kChunks, kTileBytes = kTile * D * 2;
  static_assert(kRowsPerStep <= 8 && kTile % kRowsPerStep == 0, "rows of a step must not carry into bit 3");
  const int lane = threadIdx.x % 32, c = lane % kChunks, h = lane / kChunks;
  // Addresses as integers: row * stride + base is one 32 x 32 -> 64-bit multiply-add per operand (row strides are
  // below 2^31 elements: check_rows_operand). With pointer arithmetic the compiler re-derived element offsets and
  // scaled them by 2 for every row.
  const uint64_t kc = reinterpret_cast<uint64_t>(k + g * D + c * 8), vc = reinterpret_cast<uint64_t>(v + g * D + c * 8);
  const uint32_t kb = static_cast<uint32_t>(k_stride) * 2u, vb = static_cast<uint32_t>(v_stride) * 2u;
  uint8_t* dst_h = dst + h * D * 2;
  const int ch = c ^ h;
#pragma unroll
  for (int i = 0; i < kTile / kRowsPerStep; ++i) {
    const int e = __shfl_sync(0xffffffffu, entry, i * kRowsPerStep + h);
    const uint32_t row = e < 0 ? 0u : static_cast<uint32_t>(e & kRowMask);
    uint8_t* d = dst_h + i * kRowsPerStep * D * 2 + ((ch ^ ((i * kRowsPerStep) & 7)) << 4);
    cp_async16_unless_negative(d, reinterpret_cast<const void*>(kc + static_cast<uint64_t>(row) * kb), e);
    cp_async16_unless_negative(d + kTileBytes, reinterpret_cast<const void*>(vc + static_cast<uint64_t>(row) * vb), e);
  }
}

// A CTA-wide stage of kTiles consecutive tiles (tiles kTiles * stage ..) of a work list into dst (each tile's K
// then V, tiles kStageBytes apart), tiles past the list skipped: the block kernels' common-row ring. Thread
// threadIdx.x % kLanes copies chunks lane, lane + kLanes, ... of each tile (K's 16-byte chunks, then V's); their
// entries come from stage_entries, loaded a stage before the copies are issued (in line, every thread waited one L2
// round trip for its row numbers while the whole CTA stood between two barriers; NOTES.md, issue 4).
template <int D, int kLanes>
constexpr int kTileChunksPerLane = 2 * kTile * (D / 8) / kLanes;

template <int D, int kLanes, int kTiles>
__device__ __forceinline__ void stage_entries(int (&e)[kTiles][kTileChunksPerLane<D, kLanes>], const int* work,
                                              int count_work, int stage) {
  constexpr int kChunks = D / 8;
  static_assert(kTileChunksPerLane<D, kLanes> * kLanes == 2 * kTile * kChunks,
                "the chunks of a tile must divide among the lanes");
  const int lane = threadIdx.x % kLanes;
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int it = 0; it < kTileChunksPerLane<D, kLanes>; ++it) {
      const int slot = (stage * kTiles + j) * kTile + (lane + kLanes * it) % (kTile * kChunks) / kChunks;
      e[j][it] = slot < count_work ? work[slot] : -1;
    }
}

template <int D, int kLanes, int kTiles>
__device__ __forceinline__ void gather_stage(uint8_t* dst, const int (&e)[kTiles][kTileChunksPerLane<D, kLanes>],
                                             int count_work, int stage, const __nv_bfloat16* k, int64_t k_stride,
                                             const __nv_bfloat16* v, int64_t v_stride, int g) {
  constexpr int kChunks = D / 8, kTileBytes = kTile * D * 2, kStageBytes = 2 * kTileBytes;
  const int tiles = (count_work + kTile - 1) / kTile, lane = threadIdx.x % kLanes;
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    if (stage * kTiles + j >= tiles) continue;
#pragma unroll
    for (int it = 0; it < kTileChunksPerLane<D, kLanes>; ++it) {
      const int i = lane + kLanes * it;
      const int which = i / (kTile * kChunks);  // 0: K, 1: V
      const int rem = i % (kTile * kChunks);
      const int r = rem / kChunks, c = rem % kChunks;
      const int entry = e[j][it];
      const int row = entry < 0 ? 0 : entry & kRowMask;
      const __nv_bfloat16* src = which == 0 ? k + row * k_stride : v + row * v_stride;
      cp_async16(dst + j * kStageBytes + which * kTileBytes + r * D * 2 + swizzle(r, c) * 16, src + g * D + c * 8,
                 entry >= 0);
    }
  }
}

// kLanes threads (a warp, or a whole CTA) gather the K and V rows (KV head g) of work-list tile t (< its tile count)
// into dst (K tile, then V tile; swizzled rows of D bf16), zero-filling empty slots; the entries loaded in line.
template <int D, int kLanes = 32>
__device__ __forceinline__ void gather_tile(uint8_t* dst, const int* work, int count_work, int t,
                                            const __nv_bfloat16* k, int64_t k_stride, const __nv_bfloat16* v,
                                            int64_t v_stride, int g) {
  int e[1][kTileChunksPerLane<D, kLanes>];
  stage_entries<D, kLanes, 1>(e, work, count_work, t);
  gather_stage<D, kLanes, 1>(dst, e, count_work, t, k, k_stride, v, v_stride, g);
}

// Whether the two score elements (rows lane/4 and lane/4 + 8) of work-list slot `slot` are visible.
__device__ __forceinline__ void slot_visibility(const int* work, int count_work, int slot, bool& lo, bool& hi) {
  const int entry = slot < count_work ? work[slot] : -1;
  lo = entry >= 0 && (entry & kSeenLo);
  hi = entry >= 0 && (entry & kSeenHi);
}

// s (+)= A . T^T for a swizzled 16-row tile T (K or V rows, D bf16 each) and A the 16 x D row fragments (Q or
// dO): the products with tile rows 0-7 land in s[0], rows 8-15 in s[1] (m16n8 accumulator layout).
// The even and odd k-steps accumulate separately (four chains of D / 32 dependent mma instead of two of D / 16;
// the forward's S product is on its critical path) and are added at the end.
template <int D>
__device__ __forceinline__ void rows_times_tile_t(float (&s)[2][4], const uint32_t (&a)[D / 16][4], const uint8_t* tile) {
  const int lane = threadIdx.x % 32, mi = lane / 8, r = (mi / 2) * 8 + lane % 8;
  float odd[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t b[4];
    ldmatrix_x4(b, tile + r * D * 2 + swizzle(r, kk * 2 + mi % 2) * 16);
    float (&acc)[2][4] = kk % 2 ? odd : s;
    mma_bf16_m16n8k16(acc[0], a[kk], {b[0], b[1]});
    mma_bf16_m16n8k16(acc[1], a[kk], {b[2], b[3]});
  }
#pragma unroll
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 4; ++j) s[n][j] += odd[n][j];
}

// The two m16n8 accumulators of a 16 x 16 product, as the A fragment of the next MMA (bf16, round to nearest).
__device__ __forceinline__ void accumulators_to_a(uint32_t (&a)[4], const float (&x)[2][4]) {
  a[0] = pack_bf16x2(x[0][0], x[0][1]);
  a[1] = pack_bf16x2(x[0][2], x[0][3]);
  a[2] = pack_bf16x2(x[1][0], x[1][1]);
  a[3] = pack_bf16x2(x[1][2], x[1][3]);
}

// c0, c1 (+)= A . T for dims [8 dn, 8 dn + 16) of a swizzled 16-row tile T (read transposed by ldmatrix.trans),
// A a 16 x 16 fragment over the tile's rows.
template <int D>
__device__ __forceinline__ void fragment_times_tile_pair(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4],
                                                         const uint8_t* tile, int dn) {
  const int lane = threadIdx.x % 32, mi = lane / 8, r = (mi % 2) * 8 + lane % 8;
  uint32_t b[4];
  ldmatrix_x4_trans(b, tile + r * D * 2 + swizzle(r, dn + mi / 2) * 16);
  mma_bf16_m16n8k16(c0, a, {b[0], b[1]});
  mma_bf16_m16n8k16(c1, a, {b[2], b[3]});
}

// acc (+)= A . T over all D dims (O += P V in the forward, dQ += dS K in the backward).
template <int D>
__device__ __forceinline__ void fragment_times_tile(float (&acc)[D / 8][4], const uint32_t (&a)[4], const uint8_t* tile) {
#pragma unroll
  for (int dn = 0; dn < D / 8; dn += 2) fragment_times_tile_pair<D>(acc[dn], acc[dn + 1], a, tile, dn);
}

}  // namespace sparse_attention
}  // namespace keye
