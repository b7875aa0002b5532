// Expert GEMMs for decode-size batches (a few rows per expert): the cost is streaming the routed experts' weights
// once, so each block owns one expert and 32 output columns and reads that weight slice exactly once with 16-byte
// loads, for all of the expert's rows at a time (up to 8 per pass), accumulating in fp32. Partial sums over the
// weight rows are reduced in a fixed order (shuffles, then warps in index order): deterministic.
// gate_up fuses the gather of token rows (by src) and SwiGLU; down is a plain grouped GEMV.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>

#include "common/check.h"
#include "moe_gemm/grouped_gemm.h"
#include "moe_gemm/grouped_gemm_args.h"

namespace keye {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = 32;         // output columns per block
constexpr int kMaxRows = 8;       // most expert rows per weight pass
constexpr int kStageFloats = 8128;  // activations staged per pass (kStageFloats / kRows columns; with red, < 48 KB)
constexpr int kLoads = 8;         // 16-byte weight loads per thread per batch; one batch is in flight while the
                                  // previous one is used (the kernel is bound by load latency without it)

struct DecodeParams {
  const __nv_bfloat16* x;   // gate_up: tokens [T, K]; down: rows [R, K]
  const int* src;           // gate_up: row -> flat slot t * top_k + k (-1: zero row); down: null (row r is x[r])
  int top_k;
  int64_t x_rows;
  const int* offsets;       // [E + 1]
  int num_experts;          // E
  const __nv_bfloat16* w;   // [E, K, w_cols]
  __nv_bfloat16* out;       // [R, n_out]
  int64_t rows;             // R
  int k;                    // reduction length
  int w_cols;               // 2I (gate_up) or N (down)
  int n_out;                // I (gate_up) or N (down)
};

template <bool kSwiGLU>
struct Lanes {
  static constexpr int kVecs = kSwiGLU ? 8 : 4;      // 16-byte vectors per weight row: 4 gate + 4 up, or 4
  static constexpr int kKLanes = kThreads / kVecs;    // weight rows read at once
};

__device__ __forceinline__ void fma_row(float (&acc)[8], float xv, const uint4& raw) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] = fmaf(xv, f.x, acc[2 * i]);
    acc[2 * i + 1] = fmaf(xv, f.y, acc[2 * i + 1]);
  }
}

// A batch of kLoads weight rows for this thread (rows past kc read nothing and stay zero).
template <int kKLanes>
__device__ __forceinline__ void load_batch(uint4 (&w)[kLoads], const __nv_bfloat16* wk, int kk, int kc, int w_cols) {
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int row = kk + u * kKLanes;
    w[u] = row < kc ? __ldg(reinterpret_cast<const uint4*>(wk + static_cast<int64_t>(row) * w_cols))
                    : make_uint4(0, 0, 0, 0);
  }
}

// One pass over the weight slice for up to kRows rows of expert e (nr real ones; the rest of xs is zero).
template <bool kSwiGLU, int kRows>
__device__ void expert_pass(const DecodeParams& p, float (*xs)[kStageFloats / kRows],
                            float (*red)[kRows][2 * kCols], int e, int col0, int first_row, int nr) {
  using L = Lanes<kSwiGLU>;
  constexpr int kChunk = kStageFloats / kRows;
  const int tid = threadIdx.x, vec = tid % L::kVecs, klane = tid / L::kVecs;
  // This thread's 8 weight columns: gate or up half for SwiGLU (vec 0-3 gate, 4-7 up), else one slice.
  const int wcol = kSwiGLU ? (vec < 4 ? col0 + vec * 8 : p.n_out + col0 + (vec - 4) * 8) : col0 + vec * 8;
  const __nv_bfloat16* wbase = p.w + (static_cast<int64_t>(e) * p.k) * p.w_cols + wcol;
  float acc[kRows][8];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[r][j] = 0.0f;

  for (int k0 = 0; k0 < p.k; k0 += kChunk) {
    const int kc = min(kChunk, p.k - k0);
    const __nv_bfloat16* wk = wbase + static_cast<int64_t>(k0) * p.w_cols;
    uint4 next[kLoads];
    load_batch<L::kKLanes>(next, wk, klane, kc, p.w_cols);  // weights do not wait for the activations
    __syncthreads();  // xs free
    for (int i = tid; i < kRows * kc; i += kThreads) {
      const int r = i / kc, kk = i % kc;
      float v = 0.0f;
      if (r < nr) {
        int64_t xrow = first_row + r;
        if (p.src != nullptr) {
          const int s = p.src[xrow];
          xrow = s >= 0 ? s / p.top_k : -1;
        }
        if (xrow >= 0 && xrow < p.x_rows) v = __bfloat162float(p.x[xrow * p.k + k0 + kk]);
      }
      xs[r][kk] = v;
    }
    __syncthreads();
    for (int kk = klane; kk < kc; kk += kLoads * L::kKLanes) {
      uint4 cur[kLoads];
#pragma unroll
      for (int u = 0; u < kLoads; ++u) cur[u] = next[u];
      load_batch<L::kKLanes>(next, wk, kk + kLoads * L::kKLanes, kc, p.w_cols);
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int row = min(kk + u * L::kKLanes, kc - 1);  // rows past kc hold zero weights
#pragma unroll
        for (int r = 0; r < kRows; ++r) fma_row(acc[r], xs[r][row], cur[u]);
      }
    }
  }
  // Sum over the weight rows: lanes of a warp with the same vec (fixed butterfly), then warps in order.
#pragma unroll
  for (int off = L::kVecs; off < 32; off <<= 1)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[r][j] += __shfl_xor_sync(0xffffffffu, acc[r][j], off);
  const int lane = tid % 32, warp = tid / 32;
  if (lane < L::kVecs) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int j = 0; j < 8; ++j) red[warp][r][vec * 8 + j] = acc[r][j];
  }
  __syncthreads();
  for (int i = tid; i < nr * kCols; i += kThreads) {
    const int r = i / kCols, c = i % kCols;
    float g = 0.0f, u = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      g += red[w][r][c];
      if constexpr (kSwiGLU) u += red[w][r][kCols + c];
    }
    const float v = kSwiGLU ? g / (1.0f + expf(-g)) * u : g;
    p.out[static_cast<int64_t>(first_row + r) * p.n_out + col0 + c] = __float2bfloat16(v);
  }
  __syncthreads();  // red and xs are reused by the next pass
}

// Block (x, y) serves output columns 32x.. of the y-th expert that has rows (the grid has min(E, R) rows of
// blocks, so a decode step with 8 routed experts launches 8 rows of blocks, not E).
__device__ int nth_nonempty_expert(const DecodeParams& p, int n) {
  __shared__ int found;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int seen = 0, result = -1;
    for (int base = 0; base < p.num_experts && result < 0; base += 32) {
      const int e = base + lane;
      bool has_rows = false;
      if (e < p.num_experts) {
        const ExpertRows rows = expert_rows(p.offsets, e, p.rows);
        has_rows = rows.end > rows.begin;
      }
      const unsigned mask = __ballot_sync(0xffffffffu, has_rows);
      const int count = __popc(mask);
      if (seen + count > n) {  // uniform across the warp
        const int rank = __popc(mask & ((1u << lane) - 1u));
        const int hit = __ballot_sync(0xffffffffu, has_rows && rank == n - seen);
        result = base + __ffs(hit) - 1;
      }
      seen += count;
    }
    if (lane == 0) found = result;
  }
  __syncthreads();
  return found;
}

// kRows (rows per weight pass) is picked on the host from the average rows per routed expert: registers and shared
// memory scale with it, and a pass with fewer real rows than kRows wastes arithmetic, not bandwidth.
template <bool kSwiGLU, int kRows>
__global__ void __launch_bounds__(kThreads) decode_gemv_kernel(DecodeParams p) {
  __shared__ float xs[kRows][kStageFloats / kRows];
  __shared__ float red[kWarps][kRows][2 * kCols];
  const int e = nth_nonempty_expert(p, blockIdx.y);
  if (e < 0) return;
  const int col0 = blockIdx.x * kCols;
  const auto [r0, r1] = expert_rows(p.offsets, e, p.rows);
  for (int64_t first = r0; first < r1; first += kRows)
    expert_pass<kSwiGLU, kRows>(p, xs, red, e, col0, static_cast<int>(first),
                                static_cast<int>(min(static_cast<int64_t>(kRows), r1 - first)));
}

void check_weights(const at::Tensor& w, const at::Tensor& ref, const char* ref_name, const char* op,
                   const char* layout) {
  check_cuda(w, op, "w");
  check_same_device(w, ref, op, "w", ref_name);
  check_dtype(w, {at::kBFloat16}, op, "w");
  check_dim(w, 3, op, "w", layout);
  check_contiguous(w, op, "w");
  check_size(w, 1, ref.size(1), op, "w", "the activation width");
}

void check_rows_input(const at::Tensor& x, const char* op, const char* name) {
  check_cuda(x, op, name);
  check_dtype(x, {at::kBFloat16}, op, name);
  check_dim(x, 2, op, name, "[rows, K]");
  check_contiguous(x, op, name);
}

template <bool kSwiGLU>
void launch(const DecodeParams& p, int64_t experts, at::Tensor& out) {
  if (p.rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t routed = std::min(experts, p.rows);  // at most this many experts have rows
  const dim3 grid(static_cast<unsigned>(p.n_out / kCols), static_cast<unsigned>(routed));
  const int64_t avg = (p.rows + routed - 1) / routed;  // rows per routed expert
  if (avg <= 1) decode_gemv_kernel<kSwiGLU, 1><<<grid, kThreads, 0, stream>>>(p);
  else if (avg <= 2) decode_gemv_kernel<kSwiGLU, 2><<<grid, kThreads, 0, stream>>>(p);
  else if (avg <= 4) decode_gemv_kernel<kSwiGLU, 4><<<grid, kThreads, 0, stream>>>(p);
  else decode_gemv_kernel<kSwiGLU, kMaxRows><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  zero_rows_from(out, p.offsets + experts, stream);
}

}  // namespace

at::Tensor moe_decode_gate_up_cuda(const at::Tensor& x, const at::Tensor& src, int64_t top_k, const at::Tensor& offsets,
                                   const at::Tensor& w) {
  const char* op = "moe_decode_gate_up";
  check_rows_input(x, op, "x");
  check_weights(w, x, "x", op, "[E, H, 2I]");
  const int64_t E = w.size(0), I = w.size(2) / 2;
  KEYE_CHECK(w.size(2) % (2 * kCols) == 0, "keye.", op, ": argument 'w' must have 2I columns with I a multiple of ",
             kCols, ", got shape ", dims_str(w.sizes()));
  KEYE_CHECK(top_k >= 1, "keye.", op, ": top_k must be >= 1, got ", top_k);
  check_cuda(src, op, "src");
  check_same_device(src, x, op, "src", "x");
  check_dtype(src, {at::kInt}, op, "src");
  check_dim(src, 1, op, "src", "[R]");
  check_contiguous(src, op, "src");
  const int64_t R = src.size(0);
  check_index_range(src, -1, x.size(0) * top_k - 1, op, "src");
  check_group_offsets(offsets, x, "x", R, E, op);
  KEYE_CHECK(E < 65536, "keye.", op, ": at most 65535 experts, got ", E);
  KEYE_CHECK(R < INT_MAX && x.size(1) < INT_MAX, "keye.", op, ": sizes must be below 2^31");
  at::Tensor out = at::empty({R, I}, x.options());
  const c10::cuda::CUDAGuard guard(x.device());
  DecodeParams p{reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), src.data_ptr<int>(), static_cast<int>(top_k),
                 x.size(0), offsets.data_ptr<int>(), static_cast<int>(E), reinterpret_cast<const __nv_bfloat16*>(w.data_ptr()),
                 reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), R, static_cast<int>(x.size(1)),
                 static_cast<int>(w.size(2)), static_cast<int>(I)};
  launch<true>(p, E, out);
  return out;
}

at::Tensor moe_decode_down_cuda(const at::Tensor& a, const at::Tensor& offsets, const at::Tensor& w) {
  const char* op = "moe_decode_down";
  check_rows_input(a, op, "a");
  check_weights(w, a, "a", op, "[E, I, H]");
  const int64_t E = w.size(0), N = w.size(2), R = a.size(0);
  KEYE_CHECK(N % kCols == 0, "keye.", op, ": argument 'w' must have a multiple of ", kCols, " columns, got shape ",
             dims_str(w.sizes()));
  check_group_offsets(offsets, a, "a", R, E, op);
  KEYE_CHECK(E < 65536, "keye.", op, ": at most 65535 experts, got ", E);
  KEYE_CHECK(R < INT_MAX, "keye.", op, ": at most 2^31 - 1 rows, got ", R);
  at::Tensor out = at::empty({R, N}, a.options());
  const c10::cuda::CUDAGuard guard(a.device());
  DecodeParams p{reinterpret_cast<const __nv_bfloat16*>(a.data_ptr()), nullptr, 1, R, offsets.data_ptr<int>(),
                 static_cast<int>(E), reinterpret_cast<const __nv_bfloat16*>(w.data_ptr()), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                 R, static_cast<int>(a.size(1)), static_cast<int>(N), static_cast<int>(N)};
  launch<false>(p, E, out);
  return out;
}

}  // namespace keye
