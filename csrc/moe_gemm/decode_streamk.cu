// Stream-K decode down GEMV: the routed experts' down weight rows laid end to end and cut into one equal share per
// CTA (two per SM).
//
// A tile is one token's 64 output columns (8 lanes x 16 bytes per weight row, 32 rows per load round, batches of 8
// rounds with the next batch's loads issued before the current one is used, as in decode_gemv.cu); its rows are
// (k, i) for the token's K slots, each scaled by weights[t, k] * a[t*K + k, i], and out[t] is their sum (the down
// GEMM and the weighted combine). A tile cut between CTAs is finished by the last of them to arrive (a counter per
// tile): it adds the pieces' fp32 partial sums in piece order, so the result does not depend on which CTA arrives
// last (deterministic). Unrouted slots (id -1, or >= E: only index checks report those) add nothing.
//
// When it pays (H200, NOTES.md): with at least as many tiles as SMs a share is about one whole tile, and the CTAs of
// one token start their tiles at the same row, so together they read whole weight rows, as the column-block kernel's
// CTAs do. With fewer tiles each tile is cut into pieces read at different row offsets at the same time, and it lost
// (Keye T = 1: down 13.2 vs 11.6 us; a stream-K gate_up at T = 1: 23.3 vs 16.8 us). Keye T = 8 / 16: 173.1 / 334.7
// vs 177.2 / 352.7 us per layer in a graph of 8 layers.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "common/device.h"
#include "moe_gemm/decode_common.cuh"
#include "moe_gemm/decode_streamk.h"

namespace keye {
namespace {

using namespace decode;  // NOLINT: the row-streaming layout and helpers shared with decode_gemv.cu

constexpr int kTileCols = kVecs * kVecCols;      // 64 output columns per tile
constexpr int kMaxStagedSlots = 256;             // ids (and routing weights) of the slots a CTA's share touches
constexpr int kMaxStagedBytes = 64 << 10;        // activations staged in shared memory per CTA

struct StreamParams {
  const __nv_bfloat16* act;  // a [T*K, I]
  const int* ids;            // [T, K]
  const float* weights;      // [T, K]
  const __nv_bfloat16* w;    // [E, I, H]
  __nv_bfloat16* out;        // [T, H]
  float* partial;            // [tiles, max_pieces, kTileCols]
  int* arrived;              // [tiles], zero on entry
  int top_k, I, H, num_experts;
  int tiles_per_token;       // H / 64
  int tile_rows;             // K * I
  int total_rows;            // tiles * tile_rows
  int chunk;                 // rows per CTA
  int max_pieces;
};

// One batch of rows inside one tile and one slot's expert matrix; rows is this thread's column vector in the batch's
// first weight row (null: unrouted slot, nothing to add).
struct Batch {
  const __nv_bfloat16* rows;
  int n;      // rows in the batch (0: past the CTA's share)
  int tile;
  int act;    // index of the batch's first row in the staged activations
  float scale;  // the slot's routing weight
};

__device__ Batch batch_at(const StreamParams& p, int r, int r1, const int* ids_s, const float* wt_s, int token0) {
  Batch b{nullptr, 0, 0, 0, 0.0f};
  if (r >= r1) return b;
  const int tile = r / p.tile_rows, rr = r - tile * p.tile_rows;
  const int token = tile / p.tiles_per_token, cb = tile - token * p.tiles_per_token;
  const int k = rr / p.I, i = rr - k * p.I, s = (token - token0) * p.top_k + k;
  const int e = ids_s[s];
  b.tile = tile;
  b.n = min(kBatchRows, min(r1 - r, p.I - i));  // within one slot's expert matrix
  b.act = (token - token0) * p.top_k * p.I + rr;
  b.scale = wt_s[s];
  if (e >= 0 && e < p.num_experts)
    b.rows = p.w + (static_cast<int64_t>(e) * p.I + i) * p.H + cb * kTileCols + (threadIdx.x % kVecs) * kVecCols;
  return b;
}

__device__ __forceinline__ void load_rows(const StreamParams& p, const Batch& b, uint4 (&wv)[kDepth]) {
  const int lane_row = threadIdx.x / kVecs;
#pragma unroll
  for (int u = 0; u < kDepth; ++u) {  // every load of the batch is in flight before any is used
    const int row = lane_row + u * kRowLanes;
    wv[u] = b.rows != nullptr && row < b.n
                ? __ldg(reinterpret_cast<const uint4*>(b.rows + static_cast<int64_t>(row) * p.H))
                : make_uint4(0, 0, 0, 0);
  }
}

// The tile's 64 sums (all threads take part): written out if this CTA holds the whole tile or is the last of its
// pieces to arrive, else left as this piece's partial.
__device__ void finish_tile(const StreamParams& p, int tile, float (&acc)[kVecCols], float (*red)[kTileCols],
                            float* part, int* is_last) {
  reduce_rows<kVecs, kWarps>(acc, red, part);
  const int first = static_cast<int>(static_cast<int64_t>(tile) * p.tile_rows / p.chunk);
  const int last = static_cast<int>((static_cast<int64_t>(tile + 1) * p.tile_rows - 1) / p.chunk);
  if (first != last) {
    float* pieces = p.partial + static_cast<int64_t>(tile) * p.max_pieces * kTileCols;
    if (threadIdx.x < kTileCols) pieces[(blockIdx.x - first) * kTileCols + threadIdx.x] = part[threadIdx.x];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) *is_last = atomicAdd(p.arrived + tile, 1) == last - first;
    __syncthreads();
    if (!*is_last) return;
    __threadfence();
    if (threadIdx.x < kTileCols) {
      float s = 0.0f;
      for (int q = 0; q <= last - first; ++q) s += __ldcg(pieces + q * kTileCols + threadIdx.x);
      part[threadIdx.x] = s;
    }
    __syncthreads();
  }
  if (threadIdx.x < kTileCols)  // tile = token * (H / 64) + column block: out[token, 64 * block + c]
    p.out[static_cast<int64_t>(tile) * kTileCols + threadIdx.x] = __float2bfloat16(part[threadIdx.x]);
}

__global__ void __launch_bounds__(kThreads, 2) decode_down_streamk_kernel(const StreamParams p) {
  extern __shared__ __align__(16) __nv_bfloat16 act_s[];
  __shared__ float red[kWarps][kTileCols];
  __shared__ float part[kTileCols];
  __shared__ int ids_s[kMaxStagedSlots];
  __shared__ float wt_s[kMaxStagedSlots];
  __shared__ int is_last;
  const int r0 = blockIdx.x * p.chunk, r1 = min(p.total_rows, r0 + p.chunk);
  const int token0 = r0 / p.tile_rows / p.tiles_per_token, token1 = (r1 - 1) / p.tile_rows / p.tiles_per_token;
  const int slot0 = token0 * p.top_k, slots = (token1 - token0 + 1) * p.top_k;  // <= kMaxStagedSlots (host)
  for (int j = threadIdx.x; j < slots; j += kThreads) {
    ids_s[j] = p.ids[slot0 + j];
    wt_s[j] = p.weights[slot0 + j];
  }
  __syncthreads();
  Batch cur = batch_at(p, r0, r1, ids_s, wt_s, token0);
  uint4 wv[kDepth];
  load_rows(p, cur, wv);
  {  // the tokens' activation rows while the first loads fly (16-byte pieces)
    const uint4* src = reinterpret_cast<const uint4*>(p.act + static_cast<int64_t>(slot0) * p.I);
    for (int j = threadIdx.x; j < slots * p.I / kVecCols; j += kThreads) reinterpret_cast<uint4*>(act_s)[j] = src[j];
  }
  __syncthreads();
  float acc[kVecCols];
#pragma unroll
  for (int j = 0; j < kVecCols; ++j) acc[j] = 0.0f;
  int tile = cur.tile;
  const int lane_row = threadIdx.x / kVecs;
  for (int r = r0; cur.n > 0;) {
    r += cur.n;  // where the next batch starts
    const Batch nb = batch_at(p, r, r1, ids_s, wt_s, token0);
    uint4 nv[kDepth];
    load_rows(p, nb, nv);
    if (cur.tile != tile) {  // the share moved on to the next tile: the previous one is complete here
      finish_tile(p, tile, acc, red, part, &is_last);
#pragma unroll
      for (int j = 0; j < kVecCols; ++j) acc[j] = 0.0f;
      tile = cur.tile;
    }
    if (cur.rows != nullptr) {
#pragma unroll
      for (int u = 0; u < kDepth; ++u) {
        const int row = lane_row + u * kRowLanes;
        if (row < cur.n) fma_vec(acc, cur.scale * __bfloat162float(act_s[cur.act + row]), wv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kDepth; ++u) wv[u] = nv[u];
    cur = nb;
  }
  finish_tile(p, tile, acc, red, part, &is_last);
}

// CTAs (two per SM) and rows per CTA for total rows; a CTA's share is at least one batch.
void split_rows(int64_t total, int sms, int& ctas, int& chunk) {
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(2 * sms, (total + kBatchRows - 1) / kBatchRows));
  chunk = static_cast<int>((total + want - 1) / want);
  ctas = static_cast<int>((total + chunk - 1) / chunk);
}

void launch(StreamParams p, int64_t tiles, const at::Tensor& like, size_t act_bytes, int ctas) {
  p.max_pieces = static_cast<int>((p.tile_rows + p.chunk - 1) / p.chunk + 1);
  at::Tensor partial = at::empty({tiles * p.max_pieces * kTileCols}, like.options().dtype(at::kFloat));
  at::Tensor arrived = at::zeros({tiles}, like.options().dtype(at::kInt));
  p.partial = partial.data_ptr<float>();
  p.arrived = arrived.data_ptr<int>();
  // Dynamic shared memory past 48 KB (static, ~4 KB, included) must be allowed explicitly; below 32 KB it never is
  // (Keye: 12-24 KB), so the common case makes no attribute call.
  if (act_bytes > (32 << 10))
    C10_CUDA_CHECK(cudaFuncSetAttribute(decode_down_streamk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kMaxStagedBytes));
  decode_down_streamk_kernel<<<ctas, kThreads, act_bytes, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool decode_down_streamk(const at::Tensor& a, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w,
                         at::Tensor& out) {
  const int64_t T = ids.size(0), K = ids.size(1), E = w.size(0), I = a.size(1), H = w.size(2);
  if (H % kTileCols != 0 || !activation_rows_aligned(a)) return false;
  const int64_t tiles = T * (H / kTileCols), tile_rows = K * I, total = tiles * tile_rows;
  const int sms = sm_count(a.get_device());
  if (total >= INT32_MAX || tiles < sms) return false;  // fewer tiles than SMs: pieces lose row locality (above)
  int ctas = 0, chunk = 0;
  split_rows(total, sms, ctas, chunk);
  // Tokens one CTA's share can touch: its rows plus a partial token at each end.
  const int64_t tokens = (chunk + (H / kTileCols) * tile_rows - 1) / ((H / kTileCols) * tile_rows) + 1;
  const int64_t act_bytes = tokens * tile_rows * 2;
  if (tokens * K > kMaxStagedSlots || act_bytes > kMaxStagedBytes) return false;
  StreamParams p{reinterpret_cast<const __nv_bfloat16*>(a.data_ptr()), ids.data_ptr<int>(), weights.data_ptr<float>(),
                 reinterpret_cast<const __nv_bfloat16*>(w.data_ptr()), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                 nullptr, nullptr, static_cast<int>(K), static_cast<int>(I), static_cast<int>(H), static_cast<int>(E),
                 static_cast<int>(H / kTileCols), static_cast<int>(tile_rows), static_cast<int>(total), chunk, 0};
  launch(p, tiles, a, static_cast<size_t>(act_bytes), ctas);
  return true;
}

}  // namespace keye
