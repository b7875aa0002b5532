// Expert GEMMs for decode-size batches, straight from the router's output (no routing kernels, no combine kernel):
//
//   gate_up: a[t*K + k] = swiglu(x[t] @ w1[ids[t, k]])                     [T*K, I]
//   down:    out[t]     = sum_k weights[t, k] * (a[t*K + k] @ w2[ids[t, k]])   [T, H]
//
// The cost is streaming the routed experts' weights once, so each thread keeps its 16-byte weight loads in flight:
// - gate_up: a CTA owns one expert and 32 output columns (their gate and up columns) and streams the whole
//   reduction over H in batches, the next batch's loads issued before the current one is used. The CTA of the
//   first slot routed to an expert serves every slot routed to it (weights read once per distinct expert; later
//   slots' CTAs exit). Its first batch is issued before it even knows whether it is that CTA.
// - down: a CTA owns one token and 16 or 32 output columns (32 once that gives every SM a CTA) and streams the K
//   routed experts' weight slices one after the other (double-buffered loads across slot boundaries; each batch's
//   expert id and routing weight read a batch ahead), each row times weights[t, k] * a[t*K + k]: the down GEMM and
//   the weighted combine in one fixed-order fp32 sum (deterministic, no atomics). Slots whose expert another token
//   also uses read the weights again.
//   Where the token's 64-column tiles are at least as many as the SMs (Keye from T = 5), down runs the stream-K
//   kernel of decode_streamk.cu instead (equal row shares per CTA; 3-6% faster there).
// For one token whose routed weights reach ~100 MB, keye.ops.moe runs the one-kernel layer of decode_fused.cu instead.
// Unrouted slots (id -1) give zero rows of a and add nothing to out; so do ids >= E, which only index checks
// (on by default) report.
//
// Measured (H200, Keye shape, T = 1; NOTES.md): gate_up 16.8 us, down 11.6-12.0 us; one layer 29.8-30.6 us inside a
// CUDA graph of 8 layers. Tried and measured slower (NOTES.md): gate_up's reduction split over a cluster of 4 CTAs
// (26.6 us: short CTAs spend their life in barriers, prologue and epilogue), down as a cluster of K CTAs adding
// partial sums through DSMEM (18.2 us), gate_up with three batches in flight in a cp.async ring in shared memory
// (22.6 us), 16-column gate_up CTAs three per SM (18.9 us), down launched as a programmatic dependent of gate_up (no
// gain), down prefetching its weights into shared memory while gate_up runs (gate_up at 45 us with the L1 that
// leaves; branch decode-down-prefetch), and stream-K shares at T = 1 (gate_up 23.3 us, down 13.2 us: sibling CTAs
// no longer read whole weight rows together; branch decode-streamk). Tenth session: gate_up asking the L2 (bulk
// prefetch) for the down weights its columns feed (layer 30.3 -> 33.3-33.9 us: gate_up read ~71 MB instead of 50;
// even with all 25 MB already in L2, down took 13.6 us event-timed against 16.8-18.1 after an L2 flush: its load
// latency chain, not DRAM, sets most of its time), down with 3-4 batches in flight instead of 2 (13.4 ->
// 14.6-15.0 us), and both kernels issuing their second batch before the prologue (down 15.1 -> 17.4 us, gate_up
// 20.8 -> 21.6 us on a slower machine). Down stages the activations with 16-byte loads (13.4 -> 13.2 us per kernel
// in a graph of 8).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>

#include "common/check.h"
#include "common/device.h"
#include "moe_gemm/decode_common.cuh"
#include "moe_gemm/decode_streamk.h"
#include "moe_gemm/grouped_gemm.h"
#include "moe_gemm/packed_gate_up.cuh"

namespace keye {
namespace {

using namespace decode;  // NOLINT: the row-streaming layout and helpers shared with decode_streamk.cu

constexpr int kCols = 32;       // output columns per CTA
constexpr int kStageRows = 2048;  // gate_up: reduction rows of activations staged at a time (fp32, per row of a group)

// gate_up: the 8 lanes of a weight row read 4 x 8 gate columns and the 4 x 8 matching up columns.
static_assert(kVecs == 2 * kCols / kVecCols, "gate_up: one 16-byte load per lane covers the CTA's columns");
constexpr int kOut = 2 * kCols;                   // partial sums per row of a group: gate, then up
static_assert(kStageRows % kBatchRows == 0, "a staged chunk of activations covers whole batches");

struct DecodeParams {
  const __nv_bfloat16* x;  // gate_up: x [T, H]; down: a [T*K, I]
  const int* ids;          // [T, K]
  const float* weights;    // down: [T, K]
  const __nv_bfloat16* w;  // [E, reduction, w_cols]
  __nv_bfloat16* out;      // gate_up: [T*K, I]; down: [T, H]
  int slots;               // T * K
  int top_k;
  int reduction;           // H (gate_up) or I (down)
  int w_cols;              // 2I or H
  int n_out;               // I or H
  int num_experts;         // E
  bool x_vec;              // down: rows of a start 16-byte aligned (I % 8 == 0, aligned data): staged by 16-byte loads
  bool packed;             // gate_up: w in moe_pack_gate_up's column order (packed_gate_up.cuh)
};

// gate_up: one batch of this thread's weight loads (rows b0 + lane_row + u * kRowLanes below k1; the rest read as
// zero).
__device__ __forceinline__ void load_batch(const DecodeParams& p, const __nv_bfloat16* w_slice, int b0, int k1,
                                           uint4 (&wv)[kDepth]) {
  const int lane_row = threadIdx.x / kVecs;
#pragma unroll
  for (int u = 0; u < kDepth; ++u) {  // every load of the batch is in flight before any is used
    const int row = b0 + lane_row + u * kRowLanes;
    wv[u] = row < k1 ? __ldg(reinterpret_cast<const uint4*>(w_slice + static_cast<int64_t>(row) * p.w_cols))
                     : make_uint4(0, 0, 0, 0);
  }
}

// gate_up: partial sums over all reduction rows for up to kRows activation rows (xrow[r], nr real ones): the weight
// slice w_slice (this thread's column vector already applied) is read once for all of them. wv holds the first
// batch's loads, issued by the caller (so they fly while the caller finds its rows); each later batch is issued
// before the one before it is used.
template <int kRows>
__device__ void slice_products(const DecodeParams& p, const __nv_bfloat16* w_slice, const int* xrow, int nr,
                               float (*xs)[kStageRows], uint4 (&wv)[kDepth], float (&acc)[kRows][kVecCols]) {
  const int lane_row = threadIdx.x / kVecs, k1 = p.reduction;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int j = 0; j < kVecCols; ++j) acc[r][j] = 0.0f;
  for (int b0 = 0; b0 < k1; b0 += kBatchRows) {
    if (b0 % kStageRows == 0) {  // the activations of the next kStageRows reduction rows
      const int n = min(kStageRows, k1 - b0);
      __syncthreads();  // xs free
      for (int r = 0; r < kRows; ++r)
        for (int kk = threadIdx.x; kk < n; kk += kThreads)
          xs[r][kk] = r < nr ? __bfloat162float(p.x[static_cast<int64_t>(xrow[r]) * p.reduction + b0 + kk]) : 0.0f;
      __syncthreads();
    }
    uint4 next[kDepth];
    load_batch(p, w_slice, b0 + kBatchRows, k1, next);
    const float* xr[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) xr[r] = xs[r] + b0 % kStageRows;
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      const int row = lane_row + u * kRowLanes;
      if (b0 + row < k1)
#pragma unroll
        for (int r = 0; r < kRows; ++r) fma_vec(acc[r], xr[r][row], wv[u]);
    }
#pragma unroll
    for (int u = 0; u < kDepth; ++u) wv[u] = next[u];
  }
}

// The first of the 8 weight columns this thread reads. Checkpoint order: lanes 0-3 gate columns col0 .. col0 + 31,
// 4-7 the matching up ones. Packed order: the CTA's 64 contiguous packed columns from 2 * col0 (half of a 256-column
// tile), even lanes gate and odd lanes up values (packed_gate_up.cuh); see output_column for which outputs they are.
__device__ __forceinline__ int weight_column(const DecodeParams& p, int col0) {
  const int vec = threadIdx.x % kVecs;
  if (p.packed) return 2 * col0 + vec * kVecCols;
  return vec < 4 ? col0 + vec * kVecCols : p.n_out + col0 + (vec - 4) * kVecCols;
}

// Output c (< kCols) of the CTA at col0: its column of a and where its gate and up sums are in a row of `part`
// (partial sums in weight_column's order: lane vec's 8 columns at 8 * vec).
struct OutputColumn {
  int col, gate, up;
};
__device__ __forceinline__ OutputColumn output_column(const DecodeParams& p, int col0, int c) {
  if (!p.packed) return {col0 + c, c, kCols + c};
  // Lane pair (2j, 2j + 1) holds gate and up of outputs 128t + 32 * (i / 2) + 2 * (4q + j) + i % 2, i < 8, where
  // col0 = 128t + 32q (the inverse of packed_gate_column over this CTA's packed columns).
  const int j = c / kVecCols, i = c % kVecCols;
  const int col = (col0 & ~127) + 32 * (i / 2) + 2 * (4 * ((col0 & 127) / 32) + j) + i % 2;
  return {col, 2 * kVecCols * j + i, 2 * kVecCols * j + kVecCols + i};
}

// Grid (I / kCols, T * K).
template <int kRows>
__global__ void __launch_bounds__(kThreads, 2) decode_gate_up_kernel(const DecodeParams p) {
  __shared__ float xs[kRows][kStageRows];
  __shared__ float red[kWarps][kOut];
  __shared__ float part[kRows][kOut];
  __shared__ int rows[kRows];
  __shared__ int first_slot, count, scan_next;
  const int slot = blockIdx.y, col0 = blockIdx.x * kCols;
  const int e = p.ids[slot];
  if (e < 0 || e >= p.num_experts) {  // unrouted slot: a zero row
    if (threadIdx.x < kCols)
      p.out[static_cast<int64_t>(slot) * p.n_out + output_column(p, col0, threadIdx.x).col] = __float2bfloat16(0.0f);
    return;
  }
  // The weights are the long wait: their first batch is in flight before this CTA even knows whether it serves e.
  const __nv_bfloat16* w_slice = p.w + static_cast<int64_t>(e) * p.reduction * p.w_cols + weight_column(p, col0);
  uint4 wv[kDepth];
  load_batch(p, w_slice, 0, p.reduction, wv);
  if (threadIdx.x < 32) {  // is this the first slot routed to e? (ids are L2-resident: one warp scans them)
    bool earlier = false;
    for (int base = 0; base < slot && !earlier; base += 32) {
      const int s = base + threadIdx.x;
      earlier = __any_sync(0xffffffffu, s < slot && p.ids[s] == e);
    }
    if (threadIdx.x == 0) {
      first_slot = earlier ? -1 : slot;
      scan_next = slot;
    }
  }
  __syncthreads();
  if (first_slot < 0) return;  // another CTA serves e

  for (bool first_group = true;; first_group = false) {
    if (threadIdx.x < 32) {  // the next (up to) kRows slots routed to e, in slot order
      const int lane = threadIdx.x;
      int scan = scan_next, n = 0;
      while (scan < p.slots && n < kRows) {
        const unsigned hit = __ballot_sync(0xffffffffu, scan + lane < p.slots && p.ids[scan + lane] == e);
        const int avail = __popc(hit), take = min(avail, kRows - n);
        unsigned m = hit;
        for (int i = 0; i < take; ++i) {
          if (lane == 0) rows[n + i] = scan + __ffs(m) - 1;
          m &= m - 1;
        }
        n += take;
        scan = take < avail ? scan + __ffs(m) - 1 : scan + 32;  // resume at the first slot not taken
      }
      if (lane == 0) {
        count = n;
        scan_next = scan;
      }
    }
    __syncthreads();
    const int nr = count;
    if (nr == 0) break;
    int xrow[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) xrow[r] = r < nr ? rows[r] / p.top_k : 0;
    if (!first_group) load_batch(p, w_slice, 0, p.reduction, wv);  // again (mostly from L2) for more slots
    float acc[kRows][kVecCols];
    slice_products<kRows>(p, w_slice, xrow, nr, xs, wv, acc);
#pragma unroll
    for (int r = 0; r < kRows; ++r) reduce_rows<kVecs, kWarps>(acc[r], red, part[r]);
    for (int i = threadIdx.x; i < nr * kCols; i += kThreads) {
      const int r = i / kCols;
      const OutputColumn o = output_column(p, col0, i % kCols);
      const float g = part[r][o.gate], u = part[r][o.up];
      p.out[static_cast<int64_t>(rows[r]) * p.n_out + o.col] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
    }
    __syncthreads();  // part and rows are rewritten by the next group
  }
}

// down: kDownCols output columns per CTA, kDownCols / 8 lanes per weight row, batches of kDepth loads per thread
// covering 1024 rows, two batches in flight; the token's K activation rows are staged in shared memory as bf16.
// Two shapes, both measured on the H200 (NOTES.md; per layer in a CUDA graph of layers): 16 columns with 4-load
// batches doubles the CTAs where there are fewer than SMs (Keye T = 1: 30.4 vs 32.7 us) but is slower with more
// (Keye T = 8: 202 vs 177 us; DeepSeek-V3 shape, T = 1: 227 vs 205 us), hence the choice by grid size.
constexpr int kDownThreads = 512;
constexpr int kDownWarps = kDownThreads / 32;
constexpr int kDownBatchRows = 1024;
constexpr int kMaxDownActivations = 16384;  // top_k * I (32 KB of bf16)

template <int kDownCols>
struct DownShape {
  static constexpr int kVecs = kDownCols / kVecCols;
  static constexpr int kRowLanes = kDownThreads / kVecs;
  static constexpr int kDepth = kDownBatchRows / kRowLanes;
};

// This thread's weight column vector in the expert of `slot` (null for an unrouted slot).
__device__ __forceinline__ const __nv_bfloat16* down_slice(const DecodeParams& p, int64_t slot, int col) {
  const int e = p.ids[slot];
  return e >= 0 && e < p.num_experts ? p.w + static_cast<int64_t>(e) * p.reduction * p.w_cols + col : nullptr;
}

template <int kDownCols>
__device__ __forceinline__ void load_down_batch(const DecodeParams& p, const __nv_bfloat16* w_slice, int b0,
                                                uint4 (&wv)[DownShape<kDownCols>::kDepth]) {
  using S = DownShape<kDownCols>;
  const int lane_row = threadIdx.x / S::kVecs;
#pragma unroll
  for (int u = 0; u < S::kDepth; ++u) {
    const int row = b0 + lane_row + u * S::kRowLanes;
    wv[u] = w_slice != nullptr && row < p.reduction
                ? __ldg(reinterpret_cast<const uint4*>(w_slice + static_cast<int64_t>(row) * p.w_cols))
                : make_uint4(0, 0, 0, 0);
  }
}

// Grid (H / kDownCols, T).
template <int kDownCols>
__global__ void __launch_bounds__(kDownThreads, 1) decode_down_kernel(const DecodeParams p) {
  using S = DownShape<kDownCols>;
  __shared__ alignas(16) __nv_bfloat16 a_s[kMaxDownActivations];
  __shared__ float red[kDownWarps][kDownCols];
  __shared__ float part[kDownCols];
  const int K = p.top_k, I = p.reduction, col0 = blockIdx.x * kDownCols;
  const int lane_row = threadIdx.x / S::kVecs, vec = threadIdx.x % S::kVecs, col = col0 + vec * kVecCols;
  const int64_t slot0 = static_cast<int64_t>(blockIdx.y) * K;
  const int per_slot = (I + kDownBatchRows - 1) / kDownBatchRows, batches = K * per_slot;
  // Per batch: its expert's weight slice (null: unrouted) and routing weight, read from global memory one batch
  // before they are needed so that no load of ids or weights sits between two batches' weight loads.
  const auto slot_of = [&](int b) { return slot0 + b / per_slot; };
  const __nv_bfloat16* slice0 = down_slice(p, slot0, col);
  const __nv_bfloat16* slice_next = batches > 1 ? down_slice(p, slot_of(1), col) : nullptr;
  float weight_cur = p.weights[slot0];
  uint4 wv[S::kDepth], next[S::kDepth];
  load_down_batch<kDownCols>(p, slice0, 0, wv);
  if (p.x_vec) {  // while the loads fly; 16-byte pieces (K * I is a multiple of 8)
    const uint4* src = reinterpret_cast<const uint4*>(p.x + slot0 * I);
    for (int i = threadIdx.x; i < K * I / kVecCols; i += kDownThreads) reinterpret_cast<uint4*>(a_s)[i] = __ldg(src + i);
  } else {
    for (int i = threadIdx.x; i < K * I; i += kDownThreads) a_s[i] = p.x[slot0 * I + i];
  }
  __syncthreads();
  float acc[kVecCols];
#pragma unroll
  for (int j = 0; j < kVecCols; ++j) acc[j] = 0.0f;
  bool valid_cur = slice0 != nullptr;
  for (int b = 0; b < batches; ++b) {
    const int k = b / per_slot, b0 = (b % per_slot) * kDownBatchRows;
    const __nv_bfloat16* slice_b1 = slice_next;  // batch b + 1
    if (b + 1 < batches) load_down_batch<kDownCols>(p, slice_b1, ((b + 1) % per_slot) * kDownBatchRows, next);
    slice_next = b + 2 < batches ? down_slice(p, slot_of(b + 2), col) : nullptr;      // for the next iteration
    const float weight_b1 = b + 1 < batches ? p.weights[slot_of(b + 1)] : 0.0f;      // used one iteration later
    if (valid_cur) {
      const __nv_bfloat16* ak = a_s + k * I;
#pragma unroll
      for (int u = 0; u < S::kDepth; ++u) {
        const int row = b0 + lane_row + u * S::kRowLanes;
        if (row < I) fma_vec(acc, weight_cur * __bfloat162float(ak[row]), wv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < S::kDepth; ++u) wv[u] = next[u];
    valid_cur = slice_b1 != nullptr;
    weight_cur = weight_b1;
  }
  reduce_rows<S::kVecs, kDownWarps>(acc, red, part);
  if (threadIdx.x < kDownCols)
    p.out[static_cast<int64_t>(blockIdx.y) * p.n_out + col0 + threadIdx.x] = __float2bfloat16(part[threadIdx.x]);
}

}  // namespace

at::Tensor moe_decode_gate_up_cuda(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& w, bool packed) {
  const char* op = "moe_decode_gate_up";
  check_rows_input(x, op, "x", "[T, H]");
  check_weights(w, "w", x, "x", x.size(1), op, "[E, H, 2I]");
  const int64_t E = w.size(0), H = x.size(1), I = w.size(2) / 2;
  KEYE_CHECK(w.size(2) % (2 * kCols) == 0, "keye.", op, ": argument 'w' must have 2I columns with I a multiple of ",
             kCols, ", got shape ", dims_str(w.sizes()));
  KEYE_CHECK(!packed || w.size(2) % kPackedGateUpTile == 0, "keye.", op, ": argument 'w' packed (moe_pack_gate_up) ",
             "must have 2I a multiple of ", kPackedGateUpTile, ", got shape ", dims_str(w.sizes()));
  check_decode_ids(ids, x, "x", E, op);
  check_size(ids, 0, x.size(0), op, "ids", "the token count (x.size(0))");
  const int64_t slots = ids.numel();
  at::Tensor out = at::empty({slots, I}, x.options());
  if (slots == 0 || H == 0) return out.zero_();
  const c10::cuda::CUDAGuard guard(x.device());
  DecodeParams p{reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), ids.data_ptr<int>(), nullptr,
                 reinterpret_cast<const __nv_bfloat16*>(w.data_ptr()), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                 static_cast<int>(slots), static_cast<int>(ids.size(1)), static_cast<int>(H), static_cast<int>(w.size(2)),
                 static_cast<int>(I), static_cast<int>(E)};
  p.packed = packed;
  const dim3 grid(static_cast<unsigned>(I / kCols), static_cast<unsigned>(slots));
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Rows per weight pass (registers grow with it; a pass with fewer real rows wastes arithmetic, not bandwidth; a
  // slot past a pass's rows costs another pass over the expert's weights). One while experts are rarely routed to
  // twice (slots <= E / 8), else 2 up to E slots, then from the average slots per expert. H200, Keye shape, per
  // layer in a CUDA graph of 8 (NOTES.md, twenty-sixth session), 1 / 2 rows: T = 1 30.1 / 30.8 us, T = 2 (E / 8
  // slots) 55.9 / 57.1, T = 4 (E / 4) 93.9 / 89.6, T = 8 (E / 2) 172.2 / 156.4; 64 experts, T = 2 (E / 4) 94.1 / 92.4.
  const int64_t rows = slots * 8 <= E ? 1 : slots <= E ? 2 : (slots + E - 1) / E;
  if (rows <= 1) decode_gate_up_kernel<1><<<grid, kThreads, 0, stream>>>(p);
  else if (rows <= 2) decode_gate_up_kernel<2><<<grid, kThreads, 0, stream>>>(p);
  else decode_gate_up_kernel<4><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor moe_decode_down_cuda(const at::Tensor& a, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w) {
  const char* op = "moe_decode_down";
  check_rows_input(a, op, "a", "[T * top_k, I]");
  check_weights(w, "w", a, "a", a.size(1), op, "[E, I, H]");
  const int64_t E = w.size(0), N = w.size(2);
  KEYE_CHECK(N % 16 == 0, "keye.", op, ": argument 'w' must have a multiple of 16 columns, got shape ",
             dims_str(w.sizes()));
  check_decode_ids(ids, a, "a", E, op);
  check_size(a, 0, ids.numel(), op, "a", "T * top_k (ids.numel())");
  check_routing_weights(weights, ids, a, "a", op);
  const int64_t T = ids.size(0), K = ids.size(1);
  KEYE_CHECK(K * a.size(1) <= kMaxDownActivations, "keye.", op, ": top_k * I must be at most ", kMaxDownActivations,
             " (a token's activation rows are staged in shared memory), got ", K, " * ", a.size(1));
  at::Tensor out = at::empty({T, N}, a.options());
  if (T == 0) return out;
  if (a.size(1) == 0) return out.zero_();
  const c10::cuda::CUDAGuard guard(a.device());
  if (decode_down_streamk(a, ids, weights, w, out)) return out;  // at least as many 64-column tiles as SMs
  DecodeParams p{reinterpret_cast<const __nv_bfloat16*>(a.data_ptr()), ids.data_ptr<int>(), weights.data_ptr<float>(),
                 reinterpret_cast<const __nv_bfloat16*>(w.data_ptr()), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                 static_cast<int>(T * K), static_cast<int>(K), static_cast<int>(a.size(1)), static_cast<int>(N),
                 static_cast<int>(N), static_cast<int>(E),
                 activation_rows_aligned(a)};
  // 32 columns per CTA when that already gives every SM a CTA, else 16 (twice the CTAs).
  const int cols = N % 32 == 0 && T * (N / 32) >= sm_count(a.get_device()) ? 32 : 16;
  const dim3 grid(static_cast<unsigned>(N / cols), static_cast<unsigned>(T));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (cols == 32) decode_down_kernel<32><<<grid, kDownThreads, 0, stream>>>(p);
  else decode_down_kernel<16><<<grid, kDownThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace keye
