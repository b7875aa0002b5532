// Paged decode scores when a sequence brings at most 16 (query, head) columns (Keye: one query x 16 heads).
//
// There the op is a stream over the index-key cache (D_I + 4 bytes per token, 68 B for Keye) with little math
// per byte, so the kernel is built to keep HBM busy. Per CTA (one warpgroup): one thread moves whole pages
// (64 keys x D bytes, then their 64 fp32 scales) with bulk copies (TMA without a tensor map) into a ring of
// kStages shared-memory stages, kStages - 1 pages ahead, completion tracked by one mbarrier per stage; every
// thread reads its A fragment of the current page into registers and runs wgmma in the RS form (keys = M from
// registers, the 16 columns = N from shared memory). The head sum runs in fp32 on CUDA cores (4 columns per
// thread, two shuffles), cheap at N = 16 and exact up to fp32 rounding.
//
// Keys reach the tensor core as the register operand in a permuted D order (rs_logical_group in
// dsa_device.cuh): 16-byte, conflict-free shared loads, and the cache keeps its natural layout.
//
// Optionally (DecodeLogitsArgs::group_max) the kernel also writes the maximum of every 8 consecutive scores of a row,
// which topk_rows uses to bound its search (topk_rows.cu, topk_grouped_kernel): +2-3% here at batch 64 / 128K. Or
// (DecodeLogitsArgs::cand) each CTA ends by listing its own candidates for the row's selection (list_candidates
// below; topk_lists.cu selects from the lists).
//
// Measured (H200, B = 64, 128K context, NOTES.md): loading the fragments straight from global memory into
// registers, three pages ahead, reached 66% of copy bandwidth; this ring 83-85%. The register version's
// wgmma.fence likely waits for every load still in flight into registers, so its prefetch did not overlap.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstdint>

#include "common/check.h"
#include "common/device.h"
#include "common/pdl.cuh"
#include "common/warp.cuh"
#include "dsa_indexer/dsa_device.cuh"
#include "dsa_indexer/dsa_indexer.h"
#include "dsa_indexer/indexer_logits_decode.h"
#include "dsa_indexer/order_key.cuh"

namespace keye {
namespace {

constexpr int kThreads = 128;  // one warpgroup
constexpr int kTileKeys = 64;  // one wgmma M tile = one cache page
constexpr int kColumns = 16;   // (query, head) columns: the wgmma N
// Pages in shared memory: kStages - 1 in flight while one is read. 4 (~21 KB per CTA, ten CTAs per SM) rather than 6
// (seven): the same bytes in flight per SM, more warps to overlap one CTA's arithmetic with another's wait;
// 3 / 4 / 5 / 6 stages: 179.6 / 179.7 / 179.9 / 181.2 us for the op at B = 64, 128K (NOTES.md, twenty-third session).
constexpr int kStages = 4;
// With candidate lists (Extra::kLists below) 3 stages, whose shared memory makes room for the run's scores, which the
// lists' epilogue read back from global memory before (3 and 4 stages measured alike in the twenty-third session).
// H200, twenty-eighth session: the score kernel with an epilogue that skipped the re-read, timed alone, was 7 us
// faster at B = 64 / 128K; with the scores staged here the op at B = 64 did not get faster (199.3 vs 196.8 us, in
// different calls; not separated from the 3-stage ring), at B = 1 / 8 it did, together with the selection's copy fix.
constexpr int kListStages = 3;
constexpr int kMaxDecodeTilesPerCta = 16;  // pages one CTA walks (their ids are staged in shared memory)
// At D = 64 (Keye) ten CTAs per SM (what the 4 stages' shared memory allows) need <= 48 registers per thread; the
// candidate lists' epilogue took 54 unbounded. (D = 128's stages allow six, with 50-54 registers; D = 32 is left
// unbounded.)
constexpr int kCtasPerSm = 10;

// The CTA's sequence, query rows and run of pages.
struct CtaWork {
  int seq, nq, tile_begin, ntiles;
  int64_t row0, seq_keys;
};

__device__ __forceinline__ CtaWork cta_work(const DecodeLogitsArgs& p) {
  CtaWork w;
  w.seq = blockIdx.y;
  w.nq = p.rows_per_seq;
  w.row0 = static_cast<int64_t>(w.seq) * w.nq;
  w.seq_keys = min(static_cast<int64_t>(max(p.seq_lens[w.seq], 0)), static_cast<int64_t>(p.max_pages) * 64);
  const int64_t visible_end = min(w.seq_keys, p.out_cols);
  w.tile_begin = blockIdx.x * p.tiles_per_cta;
  w.ntiles = static_cast<int>(min(static_cast<int64_t>(p.tiles_per_cta),
                                  (visible_end + kTileKeys - 1) / kTileKeys - w.tile_begin));
  return w;
}

// The sequence's query block (permuted, see the header comment) and its coefficients into shared memory, and
// the CTA's page ids (-1 for ids out of range: read as zeros).
template <int D, int H>
__device__ __forceinline__ void stage_queries(const DecodeLogitsArgs& p, const CtaWork& w, uint8_t* q_s,
                                              float* coef_s, int* page_s) {
  const int tid = threadIdx.x;
  stage_query_block<D, kColumns, kThreads>(p.q + w.row0 * H * D, w.nq * H, q_s, tid);
  if (tid < kColumns) coef_s[tid] = tid < w.nq * H ? p.coef[w.row0 * H + tid] : 0.f;
  for (int i = tid; i < w.ntiles; i += kThreads) {
    const int page = p.block_table[w.seq * p.bt_stride + w.tile_begin + i];
    page_s[i] = page >= 0 && page < p.num_pages ? page : -1;
  }
}

template <int H>
__device__ __forceinline__ void my_columns(const float* coef_s, int t, float (&cf)[4], int (&cq)[4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int col = 8 * (c / 2) + 2 * t + (c & 1);
    cf[c] = coef_s[col];
    cq[c] = col / H;
  }
}

template <int D>
__device__ __forceinline__ void tile_wgmma(float (&acc)[8], const KeySlice<D>& lo, const KeySlice<D>& hi,
                                           uint64_t desc_q) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < D / 32; ++ks) {
    uint32_t a[4];
    rs_fragment(a, lo, hi, ks);
    wgmma_m64n16k32_rs(acc, a, desc_q + 2 * ks, ks);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(acc);
}

// Group maxima (DecodeLogitsArgs::group_max): per query and tile, the maxima of the tile's kGroupsPerTile groups
// of kScoreGroupKeys keys (a warp's 16 key rows are two groups: hf = 0, 1), staged in shared memory and written
// per CTA as one contiguous run per query row (one 4-byte store per group from scattered lanes cost the kernel
// 10-16%, NOTES.md ninth session; writing them as the top-k's order keys instead of floats cost ~5% more).
constexpr int kGroupsPerTile = kTileKeys / kScoreGroupKeys;
static_assert(kScoreGroupKeys == 8, "a warp's key rows r0 + 8 hf (r0 = 16 warp + g, g < 8) form two groups");
template <int H>
__device__ __forceinline__ void stage_group_max(const float (&score)[2][kColumns / H], int col, int key_end, int nq,
                                                int i, int warp, int lane, float* gm_s) {
  constexpr int QB = kColumns / H;
  static_assert(QB <= 4, "lane q of the quad holds query q's maximum");
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const bool in_seq = col + 8 * hf < key_end;
#pragma unroll
    for (int q = 0; q < QB; ++q) {
      float m = in_seq ? score[hf][q] : -INFINITY;
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
      if (lane == q && q < nq) gm_s[q * kMaxDecodeTilesPerCta * kGroupsPerTile + i * kGroupsPerTile +
                                    2 * warp + hf] = m;
    }
  }
}

// What the kernel writes besides the scores.
enum class Extra { kNone, kGroupMax, kLists };
constexpr int stages_for(Extra e) { return e == Extra::kLists ? kListStages : kStages; }
constexpr int kRunKeys = kMaxDecodeTilesPerCta * kTileKeys;  // keys of one CTA's run, at most

template <int D>
constexpr int stage_bytes() { return kTileKeys * D + kTileKeys * 4; }
template <int D, int H, Extra kExtra>
constexpr size_t smem_bytes() {
  constexpr int kGroupMaxBytes =
      kExtra != Extra::kNone ? kColumns / H * kMaxDecodeTilesPerCta * kGroupsPerTile * 4 : 0;
  constexpr int kRunScoreBytes = kExtra == Extra::kLists ? kColumns / H * kRunKeys * 4 : 0;
  constexpr int S = stages_for(kExtra);
  return 1024 + kColumns * D + S * stage_bytes<D>() + S * 8 + kColumns * 4 + kMaxDecodeTilesPerCta * 4 +
         kGroupMaxBytes + kRunScoreBytes;
}

// The head sum of one 64-key tile and its store. acc[4 * cb + 2 * hf + e]: key row r0 + 8 * hf, column
// 8 * cb + 2t + e; cf / cq: this thread's four columns' coefficients and query slots; col: row r0's key offset in the
// CTA's run (out_run points at the run's first column of query row 0; columns from col_end on are not stored); with
// a run_s (the lists' epilogue) the scores also go to shared memory, [query][kRunKeys].
// score[hf][q] gets the score of key row r0 + 8 * hf for query q (on all four lanes of the quad).
template <int H, bool kRunScores>
__device__ __forceinline__ void head_sum_store(const float (&acc)[8], const float (&cf)[4], const int (&cq)[4],
                                               const float (&ksc)[2], float* out_run, float* run_s, int64_t ld, int nq,
                                               int col, int col_end, int t, float (&score)[2][kColumns / H]) {
  constexpr int QB = kColumns / H;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float part[QB];
#pragma unroll
    for (int q = 0; q < QB; ++q) part[q] = 0.f;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float v = cf[c] * fmaxf(acc[4 * (c / 2) + 2 * hf + (c & 1)], 0.f);
#pragma unroll
      for (int q = 0; q < QB; ++q) part[q] += cq[c] == q ? v : 0.f;
    }
    const int k = col + 8 * hf;
#pragma unroll
    for (int q = 0; q < QB; ++q) {
      part[q] += __shfl_xor_sync(0xffffffffu, part[q], 1);
      part[q] += __shfl_xor_sync(0xffffffffu, part[q], 2);
      score[hf][q] = part[q] * ksc[hf];
      if (q < nq && t == (q & 3) && k < col_end) {
        out_run[q * ld + k] = score[hf][q];
        if constexpr (kRunScores) run_s[q * kRunKeys + k] = score[hf][q];
      }
    }
  }
}

// The rank m of the unit's bound among its group maxima: the unit holds on average e = topk * keys / row_len of the
// row's selected keys; m = e + 3 sqrt(e) + 2 makes a unit with more than m of them (whose bound may then lie above
// the row's threshold, so the selection re-reads it) rare for scores without structure, and lists ~2-3 topk keys
// per row.
__device__ __forceinline__ int decode_list_rank(int topk, int keys, int64_t row_len) {
  const float e = static_cast<float>(topk) * static_cast<float>(keys) / static_cast<float>(row_len);
  return static_cast<int>(ceilf(e + 3.f * sqrtf(e))) + 2;
}

// Descending bitonic sort of one value per lane across the warp.
__device__ __forceinline__ uint32_t warp_sort_descending(uint32_t x, int lane) {
#pragma unroll
  for (int k = 2; k <= 32; k <<= 1)
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      const uint32_t o = __shfl_xor_sync(0xffffffffu, x, j);
      x = ((lane & k) == 0) == ((lane & j) == 0) ? max(x, o) : min(x, o);
    }
  return x;
}

// How many of the 32 descending keys s are above v.
__device__ __forceinline__ int count_above(const uint32_t* s, uint32_t v) {
  int pos = 0;
#pragma unroll
  for (int step = 16; step > 0; step >>= 1) pos += s[pos + step - 1] > v ? step : 0;
  return pos + (s[pos] > v);
}

// The CTA's candidate lists (DecodeLogitsArgs::cand), one per query row, after the tile loop: the group maxima are
// in gm_s and the run's scores in run_s ([query][kRunKeys]); scratch is 128 + 8 words of the ring, free by now. Per
// row: the bound b = the m-th largest of the unit's group maxima (each warp sorts its 32, each thread counts the
// maxima above its own in the four sorted runs by binary search, b = the least maximum with fewer than m above it),
// then thread j lists the keys >= b of group j if its maximum reaches b, and one block scan puts them in column
// order. 128 threads, one group each: 16 pages at most.
static_assert(kMaxDecodeTilesPerCta * kGroupsPerTile == kThreads, "list_candidates gives each thread one group");
template <int H>
__device__ void list_candidates(const DecodeLogitsArgs& p, const CtaWork& w, const float* gm_s, const float* run_s,
                                uint32_t* scratch) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  uint32_t* sorted = scratch;                                  // [4][32]
  int* warp_total = reinterpret_cast<int*>(scratch + kThreads);  // [4]
  uint32_t* bound_s = scratch + kThreads + 4;
  const int64_t run0 = static_cast<int64_t>(w.tile_begin) * kTileKeys;
  for (int q = 0; q < w.nq; ++q) {
    const int64_t row = w.row0 + q, unit = row * p.cand_units + blockIdx.x;
    const int64_t row_len = min(w.seq_keys - (w.nq - 1 - q), p.out_cols);
    const int64_t in_unit = min(row_len - run0, static_cast<int64_t>(w.ntiles) * kTileKeys);
    const int keys = in_unit > 0 ? static_cast<int>(in_unit) : 0;
    if (keys == 0) {  // block-uniform: no key of this row in the unit (not read by the selection)
      if (tid == 0) p.cand_count[unit] = 0, p.cand_bound[unit] = ~0u;
      continue;
    }
    const int groups = (keys + kScoreGroupKeys - 1) / kScoreGroupKeys;
    const int m = decode_list_rank(p.topk, keys, row_len);
    const uint32_t v = tid < groups ? order_key(gm_s[q * kMaxDecodeTilesPerCta * kGroupsPerTile + tid]) : 0u;
    uint32_t bound = 0;  // m >= groups: every key
    if (m < groups) {    // block-uniform
      sorted[tid] = warp_sort_descending(v, lane);  // padding lanes' 0 lies below every key
      if (tid == 0) *bound_s = ~0u;
      __syncthreads();
      int above = 0;
#pragma unroll
      for (int r = 0; r < kThreads / 32; ++r) above += count_above(sorted + 32 * r, v);
      if (tid < groups && above < m) atomicMin(bound_s, v);
      __syncthreads();
      bound = *bound_s;
    }
    // This thread's group: its keys at or above the bound (keys past the row, unwritten there, are masked).
    uint32_t k8[kScoreGroupKeys];
    uint32_t take = 0;
    if (tid < groups && v >= bound) {
      const float4* src = reinterpret_cast<const float4*>(run_s + q * kRunKeys + kScoreGroupKeys * tid);
      const float4 a = src[0], b = src[1];
      const float x[kScoreGroupKeys] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
      for (int e = 0; e < kScoreGroupKeys; ++e) {
        k8[e] = order_key(x[e]);
        take |= static_cast<uint32_t>(kScoreGroupKeys * tid + e < keys && k8[e] >= bound) << e;
      }
    }
    const int count = __popc(take);
    const int incl = warp_inclusive_sum(count);
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    int pos = incl - count, total = 0;
#pragma unroll
    for (int r = 0; r < kThreads / 32; ++r) {
      const int t = warp_total[r];
      pos += r < warp ? t : 0;
      total += t;
    }
    uint2* dst = p.cand + unit * kDecodeListCap;
    const int col0 = static_cast<int>(run0) + kScoreGroupKeys * tid;
#pragma unroll
    for (int e = 0; e < kScoreGroupKeys; ++e)
      if ((take >> e) & 1u) {
        if (pos < kDecodeListCap) dst[pos] = make_uint2(k8[e], static_cast<uint32_t>(col0 + e));
        ++pos;
      }
    if (tid == 0) p.cand_count[unit] = total, p.cand_bound[unit] = bound;
    __syncthreads();  // scratch is reused by the next row
  }
}

template <int D, int H, Extra kExtra>
__global__ void __launch_bounds__(kThreads, D == 64 ? kCtasPerSm : 0)
    indexer_logits_decode_kernel(const DecodeLogitsArgs p) {
  constexpr int kPageBytes = kTileKeys * D;
  static_assert(stage_bytes<D>() % 16 == 0, "the run's scores after the ring stay 16-byte aligned");
  constexpr int kRing = stages_for(kExtra);
  constexpr int QB = kColumns / H;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* q_s = smem_raw + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
  uint8_t* ring = q_s + kColumns * D;
  // kLists: [QB][kRunKeys], right after the ring's 16-byte multiples: list_candidates reads it as float4
  float* run_s = reinterpret_cast<float*>(ring + kRing * stage_bytes<D>());
  constexpr int kRunFloats = kExtra == Extra::kLists ? QB * kRunKeys : 0;
  uint64_t* full = reinterpret_cast<uint64_t*>(run_s + kRunFloats);
  float* coef_s = reinterpret_cast<float*>(full + kRing);
  int* page_s = reinterpret_cast<int*>(coef_s + kColumns);
  float* gm_s = reinterpret_cast<float*>(page_s + kMaxDecodeTilesPerCta);  // kGroupMax: [QB][tiles * 8]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  grid_dependency_wait();  // launched as a programmatic dependent: inputs may come from the kernel before
  allow_dependent_launch();
  const CtaWork w = cta_work(p);
  if (w.ntiles <= 0) return;
  stage_queries<D, H>(p, w, q_s, coef_s, page_s);
  if (tid == 0) {
    for (int st = 0; st < kRing; ++st) mbarrier_init(full + st, 1);
    fence_mbarrier_init();
  }
  fence_async_shared();
  __syncthreads();
  const uint64_t policy = l2_evict_first_policy();
  auto issue = [&](int i, int st) {  // thread 0 only: page i of the run into stage st
    const int page = page_s[i];
    uint8_t* dst = ring + st * stage_bytes<D>();
    if (page < 0) return mbarrier_arrive_expect_tx(full + st, 0);
    mbarrier_arrive_expect_tx(full + st, stage_bytes<D>());
    bulk_copy_g2s(dst, p.k + static_cast<int64_t>(page) * kPageBytes, kPageBytes, full + st, policy);
    bulk_copy_g2s(dst + kPageBytes, p.k_scale + static_cast<int64_t>(page) * kTileKeys, kTileKeys * 4, full + st,
                  policy);
  };
  if (tid == 0)
    for (int s = 0; s < kRing - 1 && s < w.ntiles; ++s) issue(s, s);
  float cf[4];
  int cq[4];
  my_columns<H>(coef_s, t, cf, cq);
  const uint64_t desc_q = smem_desc<D>(q_s);
  const int r0 = 16 * warp + g;
  // Key offsets from the run's first key: keys below key_end are in the sequence, columns below col_end are stored.
  const int64_t run0 = static_cast<int64_t>(w.tile_begin) * kTileKeys;
  const int key_end = static_cast<int>(min(w.seq_keys - run0, static_cast<int64_t>(w.ntiles) * kTileKeys));
  const int col_end = static_cast<int>(min(p.out_cols - run0, static_cast<int64_t>(w.ntiles) * kTileKeys));
  float* out_run = p.out + w.row0 * p.ld + run0;
  int st = 0, st_issue = kRing - 1;
  uint32_t parity = 0;
  for (int i = 0; i < w.ntiles; ++i) {
    if (tid == 0 && i + kRing - 1 < w.ntiles) issue(i + kRing - 1, st_issue);
    st_issue = st_issue + 1 == kRing ? 0 : st_issue + 1;
    mbarrier_wait_parity(full + st, parity);
    const uint8_t* tile = ring + st * stage_bytes<D>();
    const int col0 = i * kTileKeys;
    KeySlice<D> ka[2];
    float ksc[2];
    if (page_s[i] >= 0 && col0 + kTileKeys <= key_end) {  // a full page (block-uniform)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        load_key_slice(ka[hf], tile + (r0 + 8 * hf) * D, t, true);
        ksc[hf] = reinterpret_cast<const float*>(tile + kPageBytes)[r0 + 8 * hf];
      }
    } else {
      const bool page_ok = page_s[i] >= 0;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = r0 + 8 * hf;
        const bool valid = page_ok && col0 + r < key_end;
        load_key_slice(ka[hf], tile + r * D, t, valid);
        ksc[hf] = valid ? reinterpret_cast<const float*>(tile + kPageBytes)[r] : 0.f;
      }
    }
    fence_async_shared();  // these reads are done before the refill (async proxy) after the barrier
    __syncthreads();  // every thread has its registers: stage st can be refilled (next iteration's issue)
    st = st + 1 == kRing ? 0 : st + 1;
    parity ^= st == 0;
    float acc[8];
    tile_wgmma<D>(acc, ka[0], ka[1], desc_q);
    float score[2][QB];
    head_sum_store<H, kExtra == Extra::kLists>(acc, cf, cq, ksc, out_run, run_s, p.ld, w.nq, col0 + r0, col_end, t,
                                               score);
    if constexpr (kExtra != Extra::kNone) stage_group_max<H>(score, col0 + r0, key_end, w.nq, i, warp, lane, gm_s);
  }
  if constexpr (kExtra == Extra::kLists) {
    __syncthreads();  // every maximum staged, every score stored
    list_candidates<H>(p, w, gm_s, run_s, reinterpret_cast<uint32_t*>(ring));
  }
  if constexpr (kExtra == Extra::kGroupMax) {
    __syncthreads();
    const int n = w.ntiles * kGroupsPerTile;
    for (int q = 0; q < w.nq; ++q)
      for (int j = tid; j < n; j += kThreads)
        p.group_max[(w.row0 + q) * p.gm_ld + static_cast<int64_t>(w.tile_begin) * kGroupsPerTile + j] =
            gm_s[q * kMaxDecodeTilesPerCta * kGroupsPerTile + j];
  }
}

}  // namespace

int decode_tiles_per_cta(int num_tiles, int num_seqs, bool lists) {
  // About 64 CTAs per SM in all, 8 to kMaxDecodeTilesPerCta (16) pages each (measured at B = 64/128 and 32K/128K
  // context: 16 pages per CTA beat 32 and 64 by 2-12%; below 8 a CTA spends much of its run filling the ring),
  // but fewer pages when that would leave SMs without a CTA (one short sequence).
  const int sms = sm_count(c10::cuda::current_device());
  const int64_t total = static_cast<int64_t>(num_tiles) * num_seqs;
  const int64_t tiles = std::min<int64_t>(kMaxDecodeTilesPerCta, std::max<int64_t>(8, total / (int64_t{sms} * 64)));
  const int balanced = static_cast<int>(std::min<int64_t>(tiles, std::max<int64_t>(1, total / sms)));
  if (!lists) return balanced;
  return std::max(balanced, std::min(kMaxDecodeTilesPerCta, (num_tiles + kDecodeListUnits - 1) / kDecodeListUnits));
}

namespace {

template <int D, int H>
void launch(const DecodeLogitsArgs& p, int num_tiles, int num_seqs, cudaStream_t stream) {
  DecodeLogitsArgs q = p;
  q.tiles_per_cta = decode_tiles_per_cta(num_tiles, num_seqs, p.cand != nullptr);
  const dim3 grid((num_tiles + q.tiles_per_cta - 1) / q.tiles_per_cta, num_seqs);
  const Extra extra = p.cand ? Extra::kLists : p.group_max ? Extra::kGroupMax : Extra::kNone;
  const size_t smem = extra == Extra::kLists      ? smem_bytes<D, H, Extra::kLists>()
                      : extra == Extra::kGroupMax ? smem_bytes<D, H, Extra::kGroupMax>()
                                                  : smem_bytes<D, H, Extra::kNone>();
  auto kernel = extra == Extra::kLists      ? indexer_logits_decode_kernel<D, H, Extra::kLists>
                : extra == Extra::kGroupMax ? indexer_logits_decode_kernel<D, H, Extra::kGroupMax>
                                            : indexer_logits_decode_kernel<D, H, Extra::kNone>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  launch_dependent(kernel, grid, dim3(kThreads), smem, stream, q);
}

template <int D>
void dispatch_heads(int H, const DecodeLogitsArgs& p, int num_tiles, int num_seqs, cudaStream_t stream) {
  switch (H) {
    case 4: return launch<D, 4>(p, num_tiles, num_seqs, stream);
    case 8: return launch<D, 8>(p, num_tiles, num_seqs, stream);
    case 16: return launch<D, 16>(p, num_tiles, num_seqs, stream);
  }
  KEYE_CHECK(false, "keye.indexer_logits_paged: the narrow decode kernel takes H_I in {4, 8, 16}, got ", H);
}

}  // namespace

void indexer_logits_decode_narrow(int H, int D, const DecodeLogitsArgs& p, int num_tiles, int num_seqs,
                                  cudaStream_t stream) {
  KEYE_CHECK(num_seqs <= 65535, "keye.indexer_logits_paged: ", num_seqs, " sequences in one call exceed the grid "
             "limit of 65535; pass fewer sequences per call");
  switch (D) {
    case 32: return dispatch_heads<32>(H, p, num_tiles, num_seqs, stream);
    case 64: return dispatch_heads<64>(H, p, num_tiles, num_seqs, stream);
    case 128: return dispatch_heads<128>(H, p, num_tiles, num_seqs, stream);
  }
  KEYE_CHECK(false, "keye.indexer_logits_paged: D_I must be 32, 64 or 128, got ", D);
}

}  // namespace keye
