// DSA lightning-indexer scores on Hopper FP8 tensor cores (wgmma m64n128k32 e4m3 -> fp32): prefill (keys from a
// contiguous [N, D] array) and decode with more than 16 (query, head) columns per sequence (keys from the paged
// cache; with at most 16 the op runs the streaming kernel of indexer_logits_decode.cu instead).
//
// Operand order (as DeepGEMM's fp8_mqa_logits): keys are the M operand and the CTA's (query, head) block the N
// operand, so an accumulator row is one key and its columns are (query, head) pairs.
//
// CTA: one warpgroup (at least four per SM; the Keye instantiation D = 64, H = 16 uses 96 registers, so five fit);
// a key tile is 64 keys (one wgmma M tile, one cache page), the column block N = 128 (query, head) columns, loaded
// once into swizzled shared memory. One thread moves whole key tiles with TMA tensor copies (a 2-D tensor map over
// the keys, common/tensor_map.h) into a ring of shared-memory stages, already in the swizzle wgmma reads, so both
// wgmma operands come from shared memory and no thread touches the keys: each stage has a "full" mbarrier (the
// copy's bytes) and an "empty" one (each warp arrives after its wgmma wait), and there is no CTA barrier in the
// loop. The key scales are read from global memory a tile ahead. Rows past the key array land as zeros.
// History (NOTES.md): v4 loaded tiles with per-thread cp.async (~500 of its ~1000 loop instructions were address
// math); v6 moved them by plain bulk copies, which cannot swizzle, so every thread read its A fragment into
// registers (keys in a permuted D order) behind a CTA barrier per tile; v7 (this) +11-19% over v6 in one A/B.
//
// The head sum sum_h coef[q, h] * ReLU(dot) runs on tensor cores too, as a bf16 m16n8k16 GEMM against the
// block-diagonal coefficient matrix: with D_I = 64 a CUDA-core epilogue (ReLU, multiply-add, shuffles) costs as
// much as the FP8 GEMM itself. The ReLU'd per-head dots and the coefficients are rounded to bf16 there
// (relative 2^-9 per term). Scores go straight from registers to global memory, each store covering whole
// 32-byte sectors.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "common/device.h"
#include "common/tensor_map.h"
#include "dsa_indexer/dsa_indexer.h"
#include "dsa_indexer/dsa_checks.h"
#include "dsa_indexer/dsa_device.cuh"
#include "dsa_indexer/indexer_logits_decode.h"
#include "dsa_indexer/topk_lists.h"

namespace keye {
namespace {

constexpr int kThreads = 128;  // one warpgroup: the CTAs on an SM run independent pipelines
constexpr int kTileKeys = 64;  // one wgmma M tile = one cache page
constexpr int kColumns = 128;  // (query, head) columns of the CTA: the wgmma N
constexpr int kMaxTilesPerCta = 32;  // key tiles one CTA walks (page ids staged in shared memory)

// Key tiles in shared memory: up to kStages in flight (D = 128: fewer, to keep 4 CTAs per SM). A stage is one
// tile's keys (64 x D bytes, a multiple of the 1024-byte swizzle alignment); the scales are read from global memory.
template <int D>
constexpr int stages() { return D == 128 ? 4 : 6; }
template <int D>
constexpr size_t smem_bytes() {
  return 1024 + kColumns * D + stages<D>() * kTileKeys * D + 2 * stages<D>() * 8 + kColumns * 4 + kMaxTilesPerCta * 4;
}

struct LogitsParams {
  const uint8_t* q;      // [rows, H, D] fp8 bytes
  ScoreCoefficients coef;  // [rows, H]
  const uint8_t* k;      // contiguous keys [num_keys, D], or the paged cache [P, 64, D]
  const float* k_scale;  // [num_keys] or [P, 64]
  const int* block_table;  // paged only: [B, max_pages]
  const int* seq_lens;     // paged only: [B]
  int64_t bt_stride;
  int max_pages;
  int num_pages;
  int64_t num_keys;        // contiguous only
  int64_t q_pos0;          // contiguous only: position of query row 0
  int rows_per_seq;        // query rows of one sequence (R for prefill, n for decode)
  int row_groups;          // CTAs along the query rows of one sequence
  int tiles_per_cta;
  float* out;
  int64_t ld;
  int64_t out_cols;
};

template <int D, int H>
__global__ void __launch_bounds__(kThreads, 4)
    indexer_logits_kernel(const LogitsParams p, const __grid_constant__ CUtensorMap key_map) {
  constexpr int QB = kColumns / H;  // queries of the CTA
  constexpr int S = stages<D>();
  constexpr int kKeyBytes = kTileKeys * D;
  static_assert(kColumns % H == 0, "the column block must hold whole queries");

  extern __shared__ uint8_t smem_raw[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw);  // [S]: the tile landed
  uint64_t* empty = full + S;  // [S]: every warp is done with the tile
  float* coef_s = reinterpret_cast<float*>(empty + S);  // [kColumns]
  int* page_s = reinterpret_cast<int*>(coef_s + kColumns);  // [kMaxTilesPerCta], paged only
  // The swizzled tiles must start on a multiple of 8 rows * D bytes: the query block and the ring from the next
  // 1024-byte boundary.
  uint8_t* tiles = reinterpret_cast<uint8_t*>(page_s + kMaxTilesPerCta);
  uint8_t* q_s = tiles + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(tiles)) & 1023)) & 1023);
  uint8_t* ring = q_s + kColumns * D;  // [S][kKeyBytes]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int seq = blockIdx.y / p.row_groups;
  const int j0 = (blockIdx.y % p.row_groups) * QB;  // first query of the CTA within its sequence
  const int nq = min(QB, p.rows_per_seq - j0);
  const int64_t row0 = static_cast<int64_t>(seq) * p.rows_per_seq + j0;
  const bool paged = p.block_table != nullptr;

  // Key limit of the sequence and position of the CTA's first query.
  int64_t seq_keys, pos0;
  if (paged) {
    seq_keys = min(static_cast<int64_t>(max(p.seq_lens[seq], 0)), static_cast<int64_t>(p.max_pages) * 64);
    pos0 = seq_keys - p.rows_per_seq + j0;
  } else {
    seq_keys = p.num_keys;
    pos0 = p.q_pos0 + j0;
  }
  const int64_t visible_end = min(min(pos0 + nq, seq_keys), p.out_cols);  // keys any query of the CTA sees
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * p.tiles_per_cta;
  const int ntiles = static_cast<int>(
      min(static_cast<int64_t>(p.tiles_per_cta), (visible_end + kTileKeys - 1) / kTileKeys - tile_begin));
  if (nq <= 0 || ntiles <= 0) return;

  if (paged)
    for (int i = tid; i < ntiles; i += kThreads) {
      const int page = p.block_table[seq * p.bt_stride + tile_begin + i];
      page_s[i] = page >= 0 && page < p.num_pages ? page : -1;
    }
  if (tid == 0) {
    for (int st = 0; st < S; ++st) {
      mbarrier_init(full + st, 1);
      mbarrier_init(empty + st, kThreads / 32);
    }
    fence_mbarrier_init();
  }
  __syncthreads();  // page ids and barriers
  // Prefill keys are read again by every query block of the chunk: keep them in L2 (evict_first there ran at
  // 484 instead of 521 TFLOP/s at 128K, the score stream pushing keys out). Decode pages are streamed.
  const uint64_t policy = paged ? l2_evict_first_policy() : l2_evict_last_policy();
  auto issue = [&](int i) {  // thread 0 only: tile tile_begin + i into stage i % S
    const int st = i % S;
    // An unmapped page reads the box above row 0, which lies wholly outside the tensor: zeros.
    const int row = paged ? (page_s[i] >= 0 ? page_s[i] * kTileKeys : -kTileKeys)
                          : static_cast<int>((tile_begin + i) * kTileKeys);
    mbarrier_arrive_expect_tx(full + st, kKeyBytes);
    tma_load_2d(ring + st * kKeyBytes, &key_map, 0, row, full + st, policy);
  };
  if (tid == 0)
    for (int i = 0; i < S && i < ntiles; ++i) issue(i);

  // Query block (zero for missing queries, which then add nothing) and its coefficients.
  stage_query_block<D, kColumns, kThreads, false>(p.q + row0 * H * D, nq * H, q_s, tid);
  for (int i = tid; i < kColumns; i += kThreads) coef_s[i] = i < nq * H ? p.coef[row0 * H + i] : 0.f;
  fence_async_shared();  // the query block is read by wgmma (async proxy)
  __syncthreads();
  // B fragments of the head-sum GEMM (K = the kColumns (query, head) columns, one output column per query):
  // block diagonal, B[c][q] = coef[c] if column c belongs to query q. K-step m covers columns 16m..16m+15, whose
  // queries all fall in output tile (16m / H) / 8; this thread's entries are rows 2t, 2t+1 (+8) and output column g.
  constexpr int KM = kColumns / 16;  // k-steps of the head-sum GEMM
  constexpr int NO = (QB + 7) / 8;   // its 8-query output tiles
  uint32_t bcoef[KM][2];
#pragma unroll
  for (int m = 0; m < KM; ++m) {
    const int q = ((16 * m) / H / 8) * 8 + g;  // output column of this thread
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int c = 16 * m + 8 * half + 2 * t;
      const float lo = c / H == q ? coef_s[c] : 0.f, hi = (c + 1) / H == q ? coef_s[c + 1] : 0.f;
      bcoef[m][half] = pack_bf16x2(lo, hi);
    }
  }
  // One wgmma chain per tile, then the head sum. Measured and not kept (NOTES.md): splitting the block into 2 or
  // 4 chains so the head sum of one overlaps the next (no gain), a producer warp with two consumer warpgroups
  // sharing the key tiles (no gain; one CTA per SM), a pipeline across tiles (ptxas serialised every wgmma).
  const uint64_t desc_q = smem_desc<D>(q_s);
  const int r0 = 16 * warp + g;  // this thread's key rows in a tile: r0 and r0 + 8
  constexpr int P = (KM / NO >= 4 && NO == 1) ? 4 : (KM / NO >= 2 ? 2 : 1);  // partial sums per output tile

  // Loop-carried per-thread state, advanced a tile per iteration (ptxas rematerialised the same values from scratch
  // in every tile when they were loop-invariant): the output address of query 2t's row at key row r0, and how many
  // keys of the sequence remain from row r0 of the tile on (rows r0 and r0 + 8 exist while it is > 0 / > 8).
  // Queries past nq are never stored; their pointer stays on the CTA's last row.
  float* out_ptr = p.out + (row0 + min(2 * t, nq - 1)) * p.ld + tile_begin * kTileKeys + r0;
  int64_t keys_left = seq_keys - tile_begin * kTileKeys - r0;
  int64_t cols_left = p.out_cols - tile_begin * kTileKeys - r0;
  // The key scales of tile i for this thread's rows (zero for keys the sequence does not have), read from global
  // memory a tile ahead.
  auto key_scales = [&](int i, int64_t left, float (&ks)[2]) {
    const int64_t page = paged ? page_s[i] : tile_begin + i;  // prefill: tile i's keys as a "page" of 64
    const float* src = p.k_scale + page * kTileKeys + r0;
    ks[0] = page >= 0 && left > 0 ? __ldg(src) : 0.f;
    ks[1] = page >= 0 && left > 8 ? __ldg(src + 8) : 0.f;
  };
  float ksc_next[2];
  key_scales(0, keys_left, ksc_next);

  for (int i = 0; i < ntiles; ++i) {
    const int st = i % S;
    const float ksc[2] = {ksc_next[0], ksc_next[1]};
    if (i + 1 < ntiles) key_scales(i + 1, keys_left - kTileKeys, ksc_next);
    mbarrier_wait_parity(full + st, (i / S) & 1);
    float acc[kColumns / 2];
    const uint64_t desc_k = smem_desc<D>(ring + st * kKeyBytes);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < D / 32; ++k) {
      if (k == 0)
        wgmma_m64n128k32_ss<false>(acc, desc_k, desc_q);
      else
        wgmma_m64n128k32_ss<true>(acc, desc_k + 2 * k, desc_q + 2 * k);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc);
    // wgmma is the ring's only reader: the tile is free. Stage i - 1 is refilled a tile late, so the producer
    // thread finds its empty barrier complete instead of waiting for the other warps' arrivals on this tile.
    if (lane == 0) mbarrier_arrive(empty + st);
    if (tid == 0 && i >= 1 && i - 1 + S < ntiles) {
      mbarrier_wait_parity(empty + (i - 1) % S, ((i - 1) / S) & 1);
      issue(i - 1 + S);
    }

    // Head sum as a bf16 tensor-core GEMM over this warp's 16 keys: the wgmma accumulator of two adjacent
    // 8-column groups is exactly an m16n8k16 A fragment, so one cvt.rn.relu.bf16x2 per two values prepares it (the
    // ReLU comes free with the conversion). P independent partial sums per output tile keep the mma.sync
    // dependency chains short.
    float part[NO][P][4];
#pragma unroll
    for (int o = 0; o < NO; ++o)
#pragma unroll
      for (int pp = 0; pp < P; ++pp)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[o][pp][e] = 0.f;
#pragma unroll
    for (int m = 0; m < KM; ++m) {
      const float* v = acc + 8 * m;
      const uint32_t a[4] = {relu_bf16x2(v[0], v[1]), relu_bf16x2(v[2], v[3]), relu_bf16x2(v[4], v[5]),
                             relu_bf16x2(v[6], v[7])};
      mma_bf16_m16n8k16(part[(16 * m) / H / 8][m % P], a, bcoef[m]);
    }

    // Scale by the key's k_scale and store: one instruction writes 8 consecutive keys of 4 queries (4 sectors).
    // A key the sequence does not have is written as 0 whatever its shared-memory row held (ksc = 0 marks it).
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      if (cols_left <= 8 * hf) continue;
#pragma unroll
      for (int o = 0; o < NO; ++o)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = part[o][0][2 * hf + e];
#pragma unroll
          for (int pp = 1; pp < P; ++pp) v += part[o][pp][2 * hf + e];
          if (o * 8 + 2 * t + e < nq) out_ptr[(o * 8 + e) * p.ld + 8 * hf] = ksc[hf] != 0.f ? v * ksc[hf] : 0.f;
        }
    }
    out_ptr += kTileKeys;
    keys_left -= kTileKeys;
    cols_left -= kTileKeys;
  }
}

template <int D, int H>
void launch(const LogitsParams& p, int num_tiles, int num_seqs, cudaStream_t stream) {
  const int sms = sm_count(c10::cuda::current_device());
  constexpr int QB = kColumns / H;
  constexpr size_t smem = smem_bytes<D>();
  auto kernel = indexer_logits_kernel<D, H>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const bool paged = p.block_table != nullptr;
  const CUtensorMap key_map = byte_rows_tensor_map(
      p.k, paged ? static_cast<int64_t>(p.num_pages) * kTileKeys : p.num_keys, D, kTileKeys,
      paged ? "indexer_logits_paged" : "indexer_logits");
  LogitsParams q = p;
  q.row_groups = (p.rows_per_seq + QB - 1) / QB;
  // Enough CTAs to fill the GPU several times over, each walking a run of key tiles.
  const int64_t ctas_per_tile = static_cast<int64_t>(q.row_groups) * num_seqs;
  q.tiles_per_cta = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(kMaxTilesPerCta, static_cast<int64_t>(num_tiles) * ctas_per_tile / (sms * 32))));
  const dim3 grid((num_tiles + q.tiles_per_cta - 1) / q.tiles_per_cta, q.row_groups * num_seqs);
  KEYE_CHECK(ctas_per_tile <= 65535, "keye.indexer_logits: ", ctas_per_tile, " query blocks of ", QB,
             " queries in one call exceed the grid limit of 65535; pass fewer query rows per call");
  kernel<<<grid, kThreads, smem, stream>>>(q, key_map);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D>
void dispatch_heads(int H, const LogitsParams& p, int num_tiles, int num_seqs, cudaStream_t stream) {
  switch (H) {
    case 4: return launch<D, 4>(p, num_tiles, num_seqs, stream);
    case 8: return launch<D, 8>(p, num_tiles, num_seqs, stream);
    case 16: return launch<D, 16>(p, num_tiles, num_seqs, stream);
    case 32: return launch<D, 32>(p, num_tiles, num_seqs, stream);
    case 64: return launch<D, 64>(p, num_tiles, num_seqs, stream);
  }
}

void dispatch(int H, int D, const LogitsParams& p, int num_tiles, int num_seqs, cudaStream_t stream) {
  switch (D) {
    case 32: return dispatch_heads<32>(H, p, num_tiles, num_seqs, stream);
    case 64: return dispatch_heads<64>(H, p, num_tiles, num_seqs, stream);
    case 128: return dispatch_heads<128>(H, p, num_tiles, num_seqs, stream);
  }
}

ScoreCoefficients score_coefficients(const at::Tensor& q_scale, const at::Tensor& w, int64_t D) {
  const WeightType type = w.scalar_type() == at::kBFloat16 ? WeightType::kBFloat16
                          : w.scalar_type() == at::kHalf   ? WeightType::kFloat16
                                                           : WeightType::kFloat32;
  return {w.data_ptr(), q_scale.data_ptr<float>(), type, static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)))};
}

void check_out(const at::Tensor& out, int64_t rows, int64_t min_cols, const at::Tensor& ref, const char* op) {
  check_cuda(out, op, "out");
  check_same_device(out, ref, op, "out", "q8");
  check_dtype(out, {at::kFloat}, op, "out");
  check_dim(out, 2, op, "out", "[rows, keys]");
  check_size(out, 0, rows, op, "out", "the query row count");
  KEYE_CHECK(out.size(1) >= min_cols, "keye.", op, ": argument 'out' must have at least ", min_cols,
             " columns (one per visible key), got shape ", dims_str(out.sizes()));
  check_float4_rows(out, op, "out");
}

}  // namespace

void indexer_logits_cuda(const at::Tensor& q8, const at::Tensor& q_scale, const at::Tensor& w, const at::Tensor& k8,
                         const at::Tensor& k_scale, int64_t q_pos0, const at::Tensor& out) {
  const char* op = "indexer_logits";
  check_indexer_queries(q8, q_scale, w, 3, op);
  const int64_t R = q8.size(0), H = q8.size(1), D = q8.size(2);
  check_dense(k8, q8, "q8", {at::kFloat8_e4m3fn}, 2, op, "k8", "[N, D_I]");
  check_size(k8, 1, D, op, "k8", "D_I (q8.size(2))");
  check_dense(k_scale, q8, "q8", {at::kFloat}, 1, op, "k_scale", "[N]");
  check_size(k_scale, 0, k8.size(0), op, "k_scale", "the key count (k8.size(0))");
  KEYE_CHECK(q_pos0 >= 0 && q_pos0 + R <= k8.size(0), "keye.", op, ": the queries sit at positions [", q_pos0, ", ",
             q_pos0 + R, ") but there are only ", k8.size(0), " keys ('q_pos0' must be >= 0 and q_pos0 + q8.size(0) "
             "<= k8.size(0))");
  check_out(out, R, q_pos0 + R, q8, op);
  check_aligned16(q8, op, "q8");
  check_aligned16(k8, op, "k8");
  if (R == 0) return;
  const at::cuda::CUDAGuard guard(q8.device());
  LogitsParams p{};
  p.q = reinterpret_cast<const uint8_t*>(q8.data_ptr());
  p.coef = score_coefficients(q_scale, w, D);
  p.k = reinterpret_cast<const uint8_t*>(k8.data_ptr());
  p.k_scale = k_scale.data_ptr<float>();
  p.num_keys = k8.size(0);
  p.q_pos0 = q_pos0;
  p.rows_per_seq = static_cast<int>(R);
  p.out = out.data_ptr<float>();
  p.ld = out.stride(0);
  p.out_cols = out.size(1);
  const int num_tiles = static_cast<int>((q_pos0 + R + kTileKeys - 1) / kTileKeys);
  dispatch(static_cast<int>(H), static_cast<int>(D), p, num_tiles, 1, at::cuda::getCurrentCUDAStream());
}

namespace {

// The paged ops' common checks; returns {B, n, H, D, max_pages}.
std::array<int64_t, 5> check_paged(const char* op, const at::Tensor& q8, const at::Tensor& q_scale,
                                   const at::Tensor& w, const at::Tensor& k_cache, const at::Tensor& k_scale_cache,
                                   const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& out) {
  check_indexer_queries(q8, q_scale, w, 4, op);
  const int64_t B = q8.size(0), n = q8.size(1), H = q8.size(2), D = q8.size(3);
  check_indexer_cache(k_cache, k_scale_cache, q8, "q8", op);
  check_int32_batch(block_table, 2, B, q8, op, "block_table", "[B, max_pages]");
  check_int32_batch(seq_lens, 1, B, q8, op, "seq_lens", "[B]");
  const int64_t max_pages = block_table.size(1);
  check_out(out, B * n, max_pages * 64, q8, op);
  check_aligned16(q8, op, "q8");
  check_aligned16(k_cache, op, "k_cache");
  check_aligned16(k_scale_cache, op, "k_scale_cache");
  return {B, n, H, D, max_pages};
}

// Both score kernels' argument structs name the paged-cache fields alike.
template <typename Args>
Args paged_args(Args args, const at::Tensor& q8, const at::Tensor& q_scale, const at::Tensor& w,
                const at::Tensor& k_cache, const at::Tensor& k_scale_cache, const at::Tensor& block_table,
                const at::Tensor& seq_lens, const at::Tensor& out) {
  args.q = reinterpret_cast<const uint8_t*>(q8.data_ptr());
  args.coef = score_coefficients(q_scale, w, q8.size(3));
  args.k = reinterpret_cast<const uint8_t*>(k_cache.data_ptr());
  args.k_scale = k_scale_cache.data_ptr<float>();
  args.block_table = block_table.data_ptr<int>();
  args.seq_lens = seq_lens.data_ptr<int>();
  args.bt_stride = block_table.stride(0);
  args.max_pages = static_cast<int>(block_table.size(1));
  args.num_pages = static_cast<int>(k_cache.size(0));
  args.rows_per_seq = static_cast<int>(q8.size(1));
  args.out = out.data_ptr<float>();
  args.ld = out.stride(0);
  args.out_cols = out.size(1);
  return args;
}

}  // namespace

void indexer_logits_paged_cuda(const at::Tensor& q8, const at::Tensor& q_scale, const at::Tensor& w,
                               const at::Tensor& k_cache, const at::Tensor& k_scale_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& out,
                               const std::optional<at::Tensor>& group_max) {
  const char* op = "indexer_logits_paged";
  const auto [B, n, H, D, max_pages] =
      check_paged(op, q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens, out);
  if (group_max.has_value()) {
    const at::Tensor& g = *group_max;
    KEYE_CHECK(n * H <= 16, "keye.", op, ": argument 'group_max' is written by the streaming kernel only, for at "
               "most 16 (query, head) columns per sequence; got n * H_I = ", n * H);
    check_dense(g, q8, "q8", {at::kFloat}, 2, op, "group_max", "[B * n, groups]");
    KEYE_CHECK(g.size(0) == B * n && g.size(1) >= max_pages * 64 / kScoreGroupKeys, "keye.", op,
               ": argument 'group_max' must have shape [", B * n, ", >= ", max_pages * 64 / kScoreGroupKeys,
               "] (one maximum per ", kScoreGroupKeys, " keys), got ", dims_str(g.sizes()));
  }
  check_index_range(seq_lens, n, max_pages * 64, op, "seq_lens");
  check_index_range(block_table, 0, k_cache.size(0) - 1, op, "block_table");
  if (B == 0 || n == 0 || max_pages == 0) return;
  const at::cuda::CUDAGuard guard(q8.device());
  const int num_tiles = static_cast<int>(max_pages);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (n * H <= 16) {  // the streaming kernel of indexer_logits_decode.cu: whole pages by bulk copy
    DecodeLogitsArgs args =
        paged_args(DecodeLogitsArgs{}, q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens, out);
    if (group_max.has_value()) {
      args.group_max = group_max->data_ptr<float>();
      args.gm_ld = group_max->stride(0);
    }
    return indexer_logits_decode_narrow(static_cast<int>(H), static_cast<int>(D), args, num_tiles,
                                        static_cast<int>(B), stream);
  }
  dispatch(static_cast<int>(H), static_cast<int>(D),
           paged_args(LogitsParams{}, q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens, out), num_tiles,
           static_cast<int>(B), stream);
}

void indexer_topk_paged_cuda(const at::Tensor& q8, const at::Tensor& q_scale, const at::Tensor& w,
                             const at::Tensor& k_cache, const at::Tensor& k_scale_cache, const at::Tensor& block_table,
                             const at::Tensor& seq_lens, int64_t topk, const at::Tensor& scores,
                             const at::Tensor& indices, const std::optional<at::Tensor>& out_scores) {
  const char* op = "indexer_topk_paged";
  const auto [B, n, H, D, max_pages] =
      check_paged(op, q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens, scores);
  KEYE_CHECK(n * H <= 16, "keye.", op, ": the candidate lists come from the streaming score kernel, for at most 16 "
             "(query, head) columns per sequence; got n * H_I = ", n * H);
  KEYE_CHECK(topk >= 1 && topk <= 4096, "keye.", op, ": argument 'topk' must be an int in [1, 4096], got ", topk);
  KEYE_CHECK(max_pages * 64 < (int64_t{1} << 30), "keye.", op, ": ", max_pages, " pages per sequence do not fit int32 "
             "positions");
  float* sc_ptr = check_selection_out(indices, out_scores, B * n, topk, q8, "q8", op, "[B * n, topk]");
  check_index_range(seq_lens, n, max_pages * 64, op, "seq_lens");
  check_index_range(block_table, 0, k_cache.size(0) - 1, op, "block_table");
  if (B == 0 || n == 0) return;
  const at::cuda::CUDAGuard guard(q8.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (max_pages == 0) {  // no keys: every slot empty
    indices.fill_(-1);
    if (out_scores.has_value()) out_scores->fill_(-INFINITY);
    return;
  }
  const int num_tiles = static_cast<int>(max_pages);
  const int tiles = decode_tiles_per_cta(num_tiles, static_cast<int>(B), /*lists=*/true);
  const int units = (num_tiles + tiles - 1) / tiles;
  const auto opts = q8.options().dtype(at::kInt);
  const at::Tensor cand = at::empty({B * n * units * kDecodeListCap * 2}, opts);
  const at::Tensor counts = at::empty({B * n * units}, opts), bounds = at::empty({B * n * units}, opts);
  DecodeLogitsArgs args =
      paged_args(DecodeLogitsArgs{}, q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens, scores);
  args.cand = reinterpret_cast<uint2*>(cand.data_ptr<int>());
  args.cand_count = counts.data_ptr<int>();
  args.cand_bound = reinterpret_cast<uint32_t*>(bounds.data_ptr<int>());
  args.cand_units = units;
  args.topk = static_cast<int>(topk);
  indexer_logits_decode_narrow(static_cast<int>(H), static_cast<int>(D), args, num_tiles, static_cast<int>(B),
                               stream);
  ListRows rows{};
  rows.scores = scores.data_ptr<float>();
  rows.ld = scores.stride(0);
  rows.cols = static_cast<int>(max_pages * 64);
  rows.seq_lens = seq_lens.data_ptr<int>();
  rows.rows_per_seq = static_cast<int>(n);
  rows.cand = args.cand;
  rows.cand_count = args.cand_count;
  rows.cand_bound = args.cand_bound;
  rows.units = units;
  rows.keys_per_unit = tiles * 64;
  rows.topk = static_cast<int>(topk);
  rows.indices = indices.data_ptr<int>();
  rows.out_scores = sc_ptr;
  launch_topk_lists(rows, B * n, stream);
}

}  // namespace keye
