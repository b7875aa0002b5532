// RMSNorm as Qwen3 computes it (normalise in fp32, round to the input dtype, multiply by the weight in that dtype),
// its residual-add form, per-head RMSNorm followed by rotate-half RoPE (the q / k path of every attention layer)
// and LayerNorm followed by RoPE (the indexer's key path). Eager PyTorch spends ~7 kernels on one norm and ~7 more
// on RoPE; a decode step of the 48-layer model ran ~240 norms (NOTES.md, twenty-sixth session). One warp per row,
// fp32 math, each rounding where the reference (keye/ops/reference/norm.py) rounds; RoPE's two products and their
// sum are rounded separately as PyTorch does (no FMA contraction), so only the summation order of the mean (and
// LayerNorm's variance) differs from the reference.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/check.h"
#include "norm/norm.h"

namespace keye {
namespace {

constexpr int kWarps = 4;  // rows per 128-thread CTA

// N contiguous elements of type T, moved as accesses of at most 16 bytes (the caller guarantees the alignment).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
constexpr int access_elems() {
  return N * static_cast<int>(sizeof(T)) > 16 ? 16 / static_cast<int>(sizeof(T)) : N;
}

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  constexpr int P = access_elems<T, N>();
#pragma unroll
  for (int a = 0; a < N; a += P) {
    const Pack<T, P> pk = *reinterpret_cast<const Pack<T, P>*>(p + a);
#pragma unroll
    for (int i = 0; i < P; ++i) out[a + i] = static_cast<float>(pk.v[i]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  constexpr int P = access_elems<T, N>();
#pragma unroll
  for (int a = 0; a < N; a += P) {
    Pack<T, P> pk;
#pragma unroll
    for (int i = 0; i < P; ++i) pk.v[i] = static_cast<T>(in[a + i]);
    *reinterpret_cast<Pack<T, P>*>(p + a) = pk;
  }
}

// v rounded to T and back: the reference's `.to(x.dtype)` (identity for fp32).
template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return static_cast<float>(static_cast<T>(v));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// torch.rsqrt(mean(x^2) + eps): the mean as sum * (1 / D), as ATen's mean reduction projects it.
__device__ __forceinline__ float inverse_rms(float sum_sq, int D, float eps) {
  return rsqrtf(sum_sq * (1.f / static_cast<float>(D)) + eps);
}

// One warp per row of D elements, V per access (16 bytes when the rows allow, else 1). With kResidual the row is
// x + residual rounded to T, written to `sum` and normalised; the second pass recomputes that sum from x and
// residual (L1 / L2 hits) rather than reading back `sum`, which this kernel writes.
template <typename T, int V, bool kResidual>
__global__ void __launch_bounds__(32 * kWarps)
    rms_norm_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ residual, int64_t r_stride,
                    const T* __restrict__ weight, T* __restrict__ out, T* __restrict__ sum, int64_t rows, int D,
                    float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * x_stride;
  const T* rr = kResidual ? residual + row * r_stride : nullptr;
  auto load_row = [&](int c, float (&v)[V]) {
    load_vec<T, V>(xr + c, v);
    if constexpr (kResidual) {
      float r[V];
      load_vec<T, V>(rr + c, r);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = rounded<T>(v[i] + r[i]);
    }
  };
  float sum_sq = 0.f;
#pragma unroll 4
  for (int c = lane * V; c < D; c += 32 * V) {
    float v[V];
    load_row(c, v);
    if constexpr (kResidual) store_vec<T, V>(sum + row * D + c, v);
#pragma unroll
    for (int i = 0; i < V; ++i) sum_sq += v[i] * v[i];
  }
  const float inv = inverse_rms(warp_sum(sum_sq), D, eps);
#pragma unroll 4
  for (int c = lane * V; c < D; c += 32 * V) {
    float v[V], w[V];
    load_row(c, v);
    load_vec<T, V>(weight + c, w);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = w[i] * rounded<T>(v[i] * inv);
    store_vec<T, V>(out + row * D + c, v);
  }
}

// One warp per (token, head) row of D = 32 E elements, lane l holding elements [l E, l E + E): the rotate-half
// partner of element j (j +- D / 2) sits at the same position in lane l ^ 16. The norm before RoPE is Qwen3's
// RMSNorm (rounded to T twice, output T) or, with kLayerNorm, torch's LayerNorm of x.float() (mean and biased
// variance in fp32, output fp32: the indexer's key path).
template <typename T, int E, bool kLayerNorm>
__global__ void __launch_bounds__(32 * kWarps)
    norm_rope_kernel(const T* __restrict__ x, int64_t heads, int64_t x_stride_t, int64_t x_stride_h,
                     const T* __restrict__ weight, const T* __restrict__ bias, const float* __restrict__ cos,
                     const float* __restrict__ sin, int64_t cs_stride,
                     std::conditional_t<kLayerNorm, float, T>* __restrict__ out, int64_t rows, float eps) {
  constexpr int D = 32 * E;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t t = row / heads, h = row % heads;
  float v[E], w[E], c[E], s[E];
  load_vec<T, E>(x + t * x_stride_t + h * x_stride_h + lane * E, v);
  load_vec<T, E>(weight + lane * E, w);
  load_vec<float, E>(cos + t * cs_stride + lane * E, c);
  load_vec<float, E>(sin + t * cs_stride + lane * E, s);
  if constexpr (kLayerNorm) {
    float b[E], sum = 0.f, sum_sq = 0.f;
    load_vec<T, E>(bias + lane * E, b);
#pragma unroll
    for (int i = 0; i < E; ++i) sum += v[i];
    const float mean = warp_sum(sum) * (1.f / D);
#pragma unroll
    for (int i = 0; i < E; ++i) sum_sq += (v[i] - mean) * (v[i] - mean);
    const float rstd = rsqrtf(warp_sum(sum_sq) * (1.f / D) + eps);
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] = w[i] * ((v[i] - mean) * rstd) + b[i];
  } else {
    float sum_sq = 0.f;
#pragma unroll
    for (int i = 0; i < E; ++i) sum_sq += v[i] * v[i];
    const float inv = inverse_rms(warp_sum(sum_sq), D, eps);
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] = rounded<T>(w[i] * rounded<T>(v[i] * inv));
  }
  float o[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const float partner = __shfl_xor_sync(0xffffffffu, v[i], 16);
    const float rot = lane < 16 ? -partner : partner;  // rotate_half: [-x2, x1]
    o[i] = __fadd_rn(__fmul_rn(v[i], c[i]), __fmul_rn(rot, s[i]));
  }
  store_vec<std::conditional_t<kLayerNorm, float, T>, E>(out + row * D + lane * E, o);
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether rows of t (2-D, unit last stride) start at multiples of `bytes`.
bool rows_aligned(const at::Tensor& t, int64_t bytes) {
  return aligned(t.data_ptr(), bytes) && (t.stride(0) * static_cast<int64_t>(t.element_size())) % bytes == 0;
}

// x viewed as [rows, D] with unit stride along D (a copy only when no such view exists).
at::Tensor as_rows(const at::Tensor& x) {
  at::Tensor r = x.reshape({-1, x.size(-1)});
  return r.size(1) > 1 && r.stride(1) != 1 ? r.contiguous() : r;
}

void check_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cuda(x, op, "x");
  check_cuda(weight, op, "weight");
  check_same_device(weight, x, op, "weight", "x");
  check_dtype(x, {at::kBFloat16, at::kHalf, at::kFloat}, op, "x");
  KEYE_CHECK(weight.scalar_type() == x.scalar_type(), "keye.", op, ": argument 'weight' must have x's dtype ",
             dtype_name(x.scalar_type()), ", got ", dtype_name(weight.scalar_type()));
  KEYE_CHECK(x.dim() >= 1, "keye.", op, ": argument 'x' must have at least one dim, got a scalar");
  check_dim(weight, 1, op, "weight", "[D]");
  check_size(weight, 0, x.size(-1), op, "weight", "x's last dim");
  KEYE_CHECK(x.size(-1) <= (int64_t{1} << 30), "keye.", op, ": x's last dim must be at most 2^30, got shape ",
             dims_str(x.sizes()));
  KEYE_CHECK(std::isfinite(eps) && eps >= 0, "keye.", op, ": argument 'eps' must be finite and >= 0");
}

unsigned grid_for(int64_t rows, const char* op) {
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  KEYE_CHECK(blocks < (int64_t{1} << 31), "keye.", op, ": too many rows (", rows, ")");
  return static_cast<unsigned>(blocks);
}

template <typename T>
void launch_rms_norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, at::Tensor& out,
                     at::Tensor* sum, double eps, const char* op) {
  const int64_t rows = x.size(0);
  const int D = static_cast<int>(x.size(1));
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = D % kVec == 0 && rows_aligned(x, 16) && aligned(weight.data_ptr(), 16) &&
                   (residual == nullptr || rows_aligned(*residual, 16));
  const T* xp = static_cast<const T*>(x.data_ptr());
  const T* rp = residual ? static_cast<const T*>(residual->data_ptr()) : nullptr;
  const int64_t rs = residual ? residual->stride(0) : 0;
  const T* wp = static_cast<const T*>(weight.data_ptr());
  T* op_ = static_cast<T*>(out.data_ptr());
  T* sp = sum ? static_cast<T*>(sum->data_ptr()) : nullptr;
  const unsigned grid = grid_for(rows, op);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float e = static_cast<float>(eps);
  auto launch = [&](auto kernel) {
    kernel<<<grid, 32 * kWarps, 0, stream>>>(xp, x.stride(0), rp, rs, wp, op_, sp, rows, D, e);
  };
  if (residual) {
    if (vec) launch(rms_norm_kernel<T, kVec, true>);
    else launch(rms_norm_kernel<T, 1, true>);
  } else {
    if (vec) launch(rms_norm_kernel<T, kVec, false>);
    else launch(rms_norm_kernel<T, 1, false>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dispatch_rms_norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, at::Tensor& out,
                       at::Tensor* sum, double eps, const char* op) {
  switch (x.scalar_type()) {
    case at::kBFloat16: launch_rms_norm<__nv_bfloat16>(x, residual, weight, out, sum, eps, op); break;
    case at::kHalf: launch_rms_norm<__half>(x, residual, weight, out, sum, eps, op); break;
    default: launch_rms_norm<float>(x, residual, weight, out, sum, eps, op); break;
  }
}

template <typename T, int E, bool kLayerNorm>
void launch_rope(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias, const at::Tensor& cos,
                 const at::Tensor& sin, at::Tensor& out, double eps, const char* op) {
  using Out = std::conditional_t<kLayerNorm, float, T>;
  const int64_t rows = x.size(0) * x.size(1);
  norm_rope_kernel<T, E, kLayerNorm><<<grid_for(rows, op), 32 * kWarps, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(x.data_ptr()), x.size(1), x.stride(0), x.stride(1),
      static_cast<const T*>(weight.data_ptr()), bias ? static_cast<const T*>(bias->data_ptr()) : nullptr,
      cos.data_ptr<float>(), sin.data_ptr<float>(), cos.stride(0), static_cast<Out*>(out.data_ptr()), rows,
      static_cast<float>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool kLayerNorm>
void dispatch_rope_dim(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias, const at::Tensor& cos,
                       const at::Tensor& sin, at::Tensor& out, double eps, const char* op) {
  switch (x.size(2)) {
    case 32: launch_rope<T, 1, kLayerNorm>(x, weight, bias, cos, sin, out, eps, op); break;
    case 64: launch_rope<T, 2, kLayerNorm>(x, weight, bias, cos, sin, out, eps, op); break;
    case 128: launch_rope<T, 4, kLayerNorm>(x, weight, bias, cos, sin, out, eps, op); break;
    default: launch_rope<T, 8, kLayerNorm>(x, weight, bias, cos, sin, out, eps, op); break;
  }
}

// Checks, stride / alignment fixes and the launch shared by rms_norm_rope and layer_norm_rope.
template <bool kLayerNorm>
at::Tensor norm_rope(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias, const at::Tensor& cos,
                     const at::Tensor& sin, double eps, const char* op) {
  check_norm_args(op, x, weight, eps);
  check_dim(x, 3, op, "x", "[T, H, D]");
  const int64_t T = x.size(0), D = x.size(2);
  KEYE_CHECK(D == 32 || D == 64 || D == 128 || D == 256, "keye.", op, ": head dim D must be 32, 64, 128 or 256, ",
             "got x of shape ", dims_str(x.sizes()));
  if (bias) {
    check_cuda(*bias, op, "bias");
    check_same_device(*bias, x, op, "bias", "x");
    KEYE_CHECK(bias->scalar_type() == x.scalar_type(), "keye.", op, ": argument 'bias' must have x's dtype ",
               dtype_name(x.scalar_type()), ", got ", dtype_name(bias->scalar_type()));
    check_dim(*bias, 1, op, "bias", "[D]");
    check_size(*bias, 0, D, op, "bias", "x's head dim");
  }
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    check_cuda(*t, op, name);
    check_same_device(*t, x, op, name, "x");
    check_dtype(*t, {at::kFloat}, op, name);
    check_dim(*t, 2, op, name, "[T, D]");
    check_size(*t, 0, T, op, name, "x's token count");
    check_size(*t, 1, D, op, name, "x's head dim");
  }
  const auto out_type = kLayerNorm ? at::kFloat : x.scalar_type();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_type).memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  // Lane accesses of D / 32 elements need rows (and heads) aligned to that many bytes, up to 16; copies otherwise.
  const int64_t xb = std::min<int64_t>(D / 32 * x.element_size(), 16), cb = std::min<int64_t>(D / 32 * 4, 16);
  const bool x_ok = x.stride(2) == 1 && aligned(x.data_ptr(), xb) && (x.stride(0) * x.element_size()) % xb == 0 &&
                    (x.stride(1) * x.element_size()) % xb == 0;
  const at::Tensor xs = x_ok ? x : x.contiguous();
  const bool cs_ok = cos.stride(1) == 1 && sin.stride(1) == 1 && cos.stride(0) == sin.stride(0) &&
                     rows_aligned(cos, cb) && rows_aligned(sin, cb);
  const at::Tensor c = cs_ok ? cos : cos.contiguous(), s = cs_ok ? sin : sin.contiguous();
  const at::Tensor w = weight.contiguous(), b = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor* bp = bias ? &b : nullptr;
  switch (x.scalar_type()) {
    case at::kBFloat16: dispatch_rope_dim<__nv_bfloat16, kLayerNorm>(xs, w, bp, c, s, out, eps, op); break;
    case at::kHalf: dispatch_rope_dim<__half, kLayerNorm>(xs, w, bp, c, s, out, eps, op); break;
    default: dispatch_rope_dim<float, kLayerNorm>(xs, w, bp, c, s, out, eps, op); break;
  }
  return out;
}

}  // namespace

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm";
  check_norm_args(op, x, weight, eps);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = as_rows(x);
  at::Tensor out_rows = out.view({-1, x.size(-1)});
  dispatch_rms_norm(rows, nullptr, weight.contiguous(), out_rows, nullptr, eps, op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  const char* op = "add_rms_norm";
  check_norm_args(op, x, weight, eps);
  check_cuda(residual, op, "residual");
  check_same_device(residual, x, op, "residual", "x");
  KEYE_CHECK(residual.scalar_type() == x.scalar_type(), "keye.", op, ": argument 'residual' must have x's dtype ",
             dtype_name(x.scalar_type()), ", got ", dtype_name(residual.scalar_type()));
  KEYE_CHECK(residual.sizes() == x.sizes(), "keye.", op, ": argument 'residual' must have x's shape ",
             dims_str(x.sizes()), ", got ", dims_str(residual.sizes()));
  const auto options = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty(x.sizes(), options), sum = at::empty(x.sizes(), options);
  if (out.numel() == 0) return {out, sum};
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = as_rows(x), res_rows = as_rows(residual);
  at::Tensor out_rows = out.view({-1, x.size(-1)}), sum_rows = sum.view({-1, x.size(-1)});
  dispatch_rms_norm(rows, &res_rows, weight.contiguous(), out_rows, &sum_rows, eps, op);
  return {out, sum};
}

at::Tensor rms_norm_rope_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos,
                              const at::Tensor& sin, double eps) {
  return norm_rope<false>(x, weight, nullptr, cos, sin, eps, "rms_norm_rope");
}

at::Tensor layer_norm_rope_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& cos, const at::Tensor& sin, double eps) {
  return norm_rope<true>(x, weight, &bias, cos, sin, eps, "layer_norm_rope");
}

}  // namespace keye
