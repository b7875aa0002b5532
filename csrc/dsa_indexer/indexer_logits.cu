// DSA lightning-indexer scores on Hopper FP8 tensor cores (wgmma m64nNk32 e4m3 -> fp32).
//
// Operand order (as DeepGEMM's fp8_mqa_logits): keys are the M operand and the CTA's (query, head) block the N
// operand, so an accumulator row is one key and its columns are (query, head) pairs. Both operands are K-major
// in memory ([key][D], [query][head][D]), the only major-ness wgmma accepts for 8-bit types; tiles sit in
// shared memory in the 32/64/128-byte swizzle that matches D bytes per row.
//
// The head sum sum_h coef[q, h] * ReLU(dot) runs on tensor cores too, as a bf16 m16n8k16 GEMM against the
// block-diagonal coefficient matrix: with D_I = 64 a CUDA-core epilogue (ReLU, multiply-add, shuffles) costs as
// much as the FP8 GEMM itself. The ReLU'd per-head dots and the coefficients are rounded to bf16 there
// (relative 2^-9 per term).
//
// CTA: one warpgroup; a key tile is 64 keys (one wgmma M tile, one cache page), the column block N = 128
// (query, head) columns: prefill, and decode with more than 16 columns per sequence (with at most 16 the op
// runs the streaming kernel of indexer_logits_decode.cu instead). Four CTAs per SM run independent pipelines.
// The query block is loaded once; key tiles stream through a five-stage cp.async ring; scores go straight
// from registers to global memory, each store covering whole 32-byte sectors. Keys come from a contiguous
// [N, D] array (prefill) or through a page table from the paged cache (decode). Versions and measurements:
// NOTES.md (v1 used mma.sync m16n8k32 e4m3, which sm_90 emulates).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "common/check.h"
#include "dsa_indexer/dsa_indexer.h"
#include "dsa_indexer/dsa_checks.h"
#include "dsa_indexer/dsa_device.cuh"
#include "dsa_indexer/indexer_logits_decode.h"

namespace keye {
namespace {

constexpr int kThreads = 128;  // one warpgroup: CTAs on an SM run independent pipelines
constexpr int kTileKeys = 64;  // one wgmma M tile = one cache page
constexpr int kStages = 5;  // key tiles in shared memory: 3 in flight, the current one and the one before

struct LogitsParams {
  const uint8_t* q;      // [rows, H, D] fp8 bytes
  const float* coef;     // [rows, H]
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
__global__ void __launch_bounds__(kThreads, 4) indexer_logits_kernel(const LogitsParams p) {
  constexpr int N = 128;      // (query, head) columns of the CTA
  constexpr int QB = N / H;   // queries of the CTA
  constexpr int KS = D / 32;  // k-steps of one wgmma
  constexpr int C = D / 16;   // 16-byte chunks of one row
  static_assert(N % H == 0 && N % 16 == 0, "the column block must hold whole queries");

  extern __shared__ uint8_t smem_raw[];
  // Swizzled tiles must start on a multiple of 8 rows * D bytes: align the carve-up to 1024 bytes.
  uint8_t* smem = smem_raw + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
  uint8_t* q_s = smem;                                                    // [N][D]
  uint8_t* k_s = q_s + N * D;                                             // [kStages][kTileKeys][D]
  float* ks_s = reinterpret_cast<float*>(k_s + kStages * kTileKeys * D);  // [kStages][kTileKeys]
  float* coef_s = ks_s + kStages * kTileKeys;                             // [N]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wq = warp;
  const int seq = blockIdx.y / p.row_groups;
  const int j0 = (blockIdx.y % p.row_groups) * QB;  // first query of the CTA within its sequence
  const int nq = min(QB, p.rows_per_seq - j0);
  const int64_t row0 = static_cast<int64_t>(seq) * p.rows_per_seq + j0;

  // Key limit of the sequence and position of the CTA's first query.
  int64_t seq_keys, pos0;
  if (p.block_table) {
    seq_keys = min(static_cast<int64_t>(max(p.seq_lens[seq], 0)), static_cast<int64_t>(p.max_pages) * 64);
    pos0 = seq_keys - p.rows_per_seq + j0;
  } else {
    seq_keys = p.num_keys;
    pos0 = p.q_pos0 + j0;
  }
  const int64_t visible_end = min(min(pos0 + nq, seq_keys), p.out_cols);  // keys any query of the CTA sees
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * p.tiles_per_cta;
  const int64_t tile_end = min(tile_begin + p.tiles_per_cta, (visible_end + kTileKeys - 1) / kTileKeys);
  if (nq <= 0 || tile_begin >= tile_end) return;

  // Query block and its coefficients (zero for missing queries, which then add nothing).
  for (int i = tid; i < N * C; i += kThreads) {
    const int col = i / C, chunk = i % C;
    const bool ok = col < nq * H;
    const uint8_t* src = p.q + ((row0 * H + (ok ? col : 0)) * D + chunk * 16);
    cp_async16(q_s + swz<D>(col, chunk), src, ok);
  }
  for (int i = tid; i < N; i += kThreads) coef_s[i] = i < nq * H ? p.coef[row0 * H + i] : 0.f;

  // Row of key s of this sequence in p.k / p.k_scale (a cache slot when paged), or -1 past the sequence or for a
  // page id out of range (zero-filled, never read).
  auto key_row = [&](int64_t s) -> int64_t {
    if (s >= seq_keys) return -1;
    if (!p.block_table) return s;
    const int page = p.block_table[seq * p.bt_stride + (s >> 6)];
    return page >= 0 && page < p.num_pages ? static_cast<int64_t>(page) * 64 + (s & 63) : -1;
  };
  auto load_tile = [&](int64_t tile, int stage_idx) {
    uint8_t* dst = k_s + stage_idx * kTileKeys * D;
    const int64_t key0 = tile * kTileKeys;
    for (int i = tid; i < kTileKeys * C; i += kThreads) {
      const int r = i / C, chunk = i % C;
      const int64_t row = key_row(key0 + r);
      cp_async16(dst + swz<D>(r, chunk), p.k + (row < 0 ? 0 : row * D + chunk * 16), row >= 0);
    }
    for (int r = tid; r < kTileKeys; r += kThreads) {
      const int64_t row = key_row(key0 + r);
      cp_async4(ks_s + stage_idx * kTileKeys + r, p.k_scale + (row < 0 ? 0 : row), row >= 0);
    }
  };

  // Ring of kStages key tiles: tile t lives in stage t % kStages; the refill issued with tile t goes to tile
  // t - 2's stage, kStages - 2 tiles ahead.
  constexpr int kAhead = kStages - 2;  // tiles loaded before the first wait
#pragma unroll
  for (int st = 0; st < kAhead; ++st) {
    if (tile_begin + st < tile_end) load_tile(tile_begin + st, st);
    cp_async_commit();
  }
  __syncthreads();  // coef_s
  const int g = lane >> 2, tig = lane & 3;
  // B fragments of the head-sum GEMM (K = the N (query, head) columns, one output column per query): block
  // diagonal, B[c][q] = coef[c] if column c belongs to query q. K-step m covers columns 16m..16m+15, whose queries
  // all fall in output tile nt_of(m); this thread's entries are rows 2tig, 2tig+1 (+8) and output column g.
  constexpr int KM = N / 16;            // k-steps of the head-sum GEMM
  constexpr int NO = (QB + 7) / 8;      // its 8-query output tiles
  uint32_t bcoef[KM][2];
#pragma unroll
  for (int m = 0; m < KM; ++m) {
    const int q = ((16 * m) / H / 8) * 8 + g;  // output column of this thread
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int c = 16 * m + 8 * half + 2 * tig;
      const float lo = c / H == q ? coef_s[c] : 0.f, hi = (c + 1) / H == q ? coef_s[c + 1] : 0.f;
      bcoef[m][half] = pack_bf16x2(lo, hi);
    }
  }
  const uint64_t desc_q = smem_desc<D>(q_s);
  // Each tile: wgmma, wait, epilogue. Overlapping tile t's wgmma with tile t-1's epilogue (two accumulator
  // sets, v5) needed 210 registers, halved the CTAs per SM and ran at 263 instead of 449 TFLOP/s (NOTES.md).
  float acc[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;

  // Waits for tile `tile`, refills the stage of tile - 2 (tile - 1's is free too; kept simple), issues the wgmma.
  auto issue = [&](int64_t tile) {
    cp_async_wait_group<kAhead - 1>();
    fence_async_shared();
    __syncthreads();  // tile `tile` landed; tile - 2's wgmma and epilogue are done in every warp
    const int64_t next = tile + kAhead;
    if (next < tile_end) load_tile(next, static_cast<int>((next - tile_begin) % kStages));
    cp_async_commit();
    const uint64_t desc_k = smem_desc<D>(k_s + ((tile - tile_begin) % kStages) * kTileKeys * D);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) wgmma_m64n128k32(acc, desc_k + 2 * ks, desc_q + 2 * ks, ks);
    wgmma_commit();
    fence_operands(acc);
  };

  auto epilogue = [&](int64_t tile) {
    const int st = static_cast<int>((tile - tile_begin) % kStages);
    // Epilogue: the head sum sum_h coef[q, h] * ReLU(dot[key, (q, h)]) as a bf16 tensor-core GEMM over this warp's
    // 16 keys: the wgmma accumulator of two adjacent 8-column groups is exactly an m16n8k16 A fragment, so one
    // cvt.rn.relu.bf16x2 per two values prepares it (the ReLU comes free with the conversion).
    // KM / NO k-steps feed each output tile; P independent partial accumulators per tile keep the mma.sync
    // dependency chains short (one accumulator made a chain of 8 mma latencies per tile for H_I = 16).
    constexpr int P = (KM / NO >= 4 && NO == 1) ? 4 : (KM / NO >= 2 ? 2 : 1);
    float part[NO][P][4];
#pragma unroll
    for (int o = 0; o < NO; ++o)
#pragma unroll
      for (int pp = 0; pp < P; ++pp)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[o][pp][e] = 0.f;
#pragma unroll
    for (int m = 0; m < KM; ++m) {
      const uint32_t a[4] = {relu_bf16x2(acc[8 * m + 0], acc[8 * m + 1]), relu_bf16x2(acc[8 * m + 2], acc[8 * m + 3]),
                             relu_bf16x2(acc[8 * m + 4], acc[8 * m + 5]), relu_bf16x2(acc[8 * m + 6], acc[8 * m + 7])};
      mma_bf16_m16n8k16(part[(16 * m) / H / 8][m % P], a, bcoef[m]);
    }
    float out_acc[NO][4];
#pragma unroll
    for (int o = 0; o < NO; ++o)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        out_acc[o][e] = part[o][0][e];
#pragma unroll
        for (int pp = 1; pp < P; ++pp) out_acc[o][e] += part[o][pp][e];
      }
    // Scale by the key's k_scale and store: one instruction writes 8 consecutive keys of 4 queries (4 sectors).
    const float* kscale = ks_s + st * kTileKeys;
    const int64_t key0 = tile * kTileKeys;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int key = wq * 16 + hf * 8 + g;
      const float sk = kscale[key];
      if (key0 + key >= p.out_cols) continue;
      float* out_col = p.out + row0 * p.ld + key0 + key;
#pragma unroll
      for (int o = 0; o < NO; ++o)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int qi = o * 8 + 2 * tig + e;
          if (qi < nq) out_col[qi * p.ld] = out_acc[o][2 * hf + e] * sk;
        }
    }
  };

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    issue(tile);
    wgmma_wait<0>();
    fence_operands(acc);
    epilogue(tile);
  }
  cp_async_wait_all();
}

template <int D, int H>
void launch(const LogitsParams& p, int num_tiles, int num_seqs, cudaStream_t stream) {
  constexpr int N = 128;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  constexpr int QB = N / H;
  const size_t smem = 1024 + N * D + kStages * kTileKeys * D + (kStages * kTileKeys + N) * sizeof(float);
  auto kernel = indexer_logits_kernel<D, H>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  LogitsParams q = p;
  q.row_groups = (p.rows_per_seq + QB - 1) / QB;
  // Enough CTAs to fill the GPU several times over, each walking a run of key tiles.
  const int64_t ctas_per_tile = static_cast<int64_t>(q.row_groups) * num_seqs;
  q.tiles_per_cta = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(32, static_cast<int64_t>(num_tiles) * ctas_per_tile / (sms * 32))));
  const dim3 grid((num_tiles + q.tiles_per_cta - 1) / q.tiles_per_cta, q.row_groups * num_seqs);
  KEYE_CHECK(ctas_per_tile <= 65535, "keye.indexer_logits: ", ctas_per_tile, " query blocks of ", QB,
             " queries in one call exceed the grid limit of 65535; pass fewer query rows per call");
  kernel<<<grid, kThreads, smem, stream>>>(q);
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

void indexer_logits_cuda(const at::Tensor& q8, const at::Tensor& coef, const at::Tensor& k8, const at::Tensor& k_scale,
                         int64_t q_pos0, const at::Tensor& out) {
  const char* op = "indexer_logits";
  check_indexer_queries(q8, coef, 3, op);
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
  p.coef = coef.data_ptr<float>();
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

void indexer_logits_paged_cuda(const at::Tensor& q8, const at::Tensor& coef, const at::Tensor& k_cache,
                               const at::Tensor& k_scale_cache, const at::Tensor& block_table,
                               const at::Tensor& seq_lens, const at::Tensor& out) {
  const char* op = "indexer_logits_paged";
  check_indexer_queries(q8, coef, 4, op);
  const int64_t B = q8.size(0), n = q8.size(1), H = q8.size(2), D = q8.size(3);
  check_indexer_cache(k_cache, k_scale_cache, q8, "q8", op);
  check_int32_batch(block_table, 2, B, q8, op, "block_table", "[B, max_pages]");
  check_int32_batch(seq_lens, 1, B, q8, op, "seq_lens", "[B]");
  const int64_t max_pages = block_table.size(1);
  check_out(out, B * n, max_pages * 64, q8, op);
  check_aligned16(q8, op, "q8");
  check_aligned16(k_cache, op, "k_cache");
  check_aligned16(k_scale_cache, op, "k_scale_cache");
  check_index_range(seq_lens, n, max_pages * 64, op, "seq_lens");
  check_index_range(block_table, 0, k_cache.size(0) - 1, op, "block_table");
  if (B == 0 || n == 0 || max_pages == 0) return;
  const at::cuda::CUDAGuard guard(q8.device());
  const int num_tiles = static_cast<int>(max_pages);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Both kernels' argument structs name the paged-cache fields alike.
  auto paged_args = [&](auto args) {
    args.q = reinterpret_cast<const uint8_t*>(q8.data_ptr());
    args.coef = coef.data_ptr<float>();
    args.k = reinterpret_cast<const uint8_t*>(k_cache.data_ptr());
    args.k_scale = k_scale_cache.data_ptr<float>();
    args.block_table = block_table.data_ptr<int>();
    args.seq_lens = seq_lens.data_ptr<int>();
    args.bt_stride = block_table.stride(0);
    args.max_pages = static_cast<int>(max_pages);
    args.num_pages = static_cast<int>(k_cache.size(0));
    args.rows_per_seq = static_cast<int>(n);
    args.out = out.data_ptr<float>();
    args.ld = out.stride(0);
    args.out_cols = out.size(1);
    return args;
  };
  if (n * H <= 16)  // the streaming kernel of indexer_logits_decode.cu: whole pages by bulk copy
    return indexer_logits_decode_narrow(static_cast<int>(H), static_cast<int>(D), paged_args(DecodeLogitsArgs{}),
                                        num_tiles, static_cast<int>(B), stream);
  dispatch(static_cast<int>(H), static_cast<int>(D), paged_args(LogitsParams{}), num_tiles, static_cast<int>(B),
           stream);
}

}  // namespace keye
