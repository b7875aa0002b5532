// Scatter tokens into expert order and gather-sum them back.
//
// permute:   one block per token reads its row once (16-byte vectors) and writes it to each of its
//            top-k rows, optionally scaled; extra blocks zero the rows no token targets (alignment
//            padding and unrouted slots). Reading x once is what a gather (index_select) cannot do:
//            it moves T*H + T*K*H elements instead of 2*T*K*H.
// unpermute: one block per token sums its k rows in fp32, in slot order (deterministic, no atomics).
// slot_dot:  one block per token takes the dot product of its row with each of its k permuted rows (the
//            routing-weight gradient); fixed reduction order, so deterministic.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "common/check.h"
#include "common/cutlass_types.h"
#include "moe_permute/moe_permute.h"

namespace keye {
namespace {

constexpr int kThreads = 256;
constexpr int kPadRowsPerBlock = 8;
constexpr int kMaxTopK = 256;

template <typename T, int VEC>
using Vec = cutlass::AlignedArray<T, VEC, sizeof(T) * VEC>;

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> scale_vec(const Vec<T, VEC>& v, float s) {
  cutlass::NumericConverter<float, T> to_f;
  cutlass::NumericConverter<T, float> from_f;
  Vec<T, VEC> r;
#pragma unroll
  for (int i = 0; i < VEC; ++i) r[i] = from_f(to_f(v[i]) * s);
  return r;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) permute_kernel(
    const T* __restrict__ x, int64_t x_row_stride, const int* __restrict__ dest, const float* __restrict__ scale,
    const int* __restrict__ src, T* __restrict__ out, int num_tokens, int top_k, int hidden, int num_rows) {
  const int vecs = hidden / VEC;
  if (blockIdx.x < num_tokens) {
    __shared__ int rows[kMaxTopK];
    __shared__ float scales[kMaxTopK];
    const int64_t t = blockIdx.x;
    for (int k = threadIdx.x; k < top_k; k += blockDim.x) {
      const int d = dest[t * top_k + k];
      rows[k] = (d >= 0 && d < num_rows) ? d : -1;  // out-of-range rows are never written
      scales[k] = scale ? scale[t * top_k + k] : 1.f;
    }
    __syncthreads();
    const auto* xrow = reinterpret_cast<const Vec<T, VEC>*>(x + t * x_row_stride);
    for (int j = threadIdx.x; j < vecs; j += blockDim.x) {
      const Vec<T, VEC> v = xrow[j];
      for (int k = 0; k < top_k; ++k) {
        const int d = rows[k];
        if (d < 0) continue;
        auto* orow = reinterpret_cast<Vec<T, VEC>*>(out + static_cast<int64_t>(d) * hidden);
        orow[j] = scale ? scale_vec<T, VEC>(v, scales[k]) : v;
      }
    }
  } else {
    const int64_t first = static_cast<int64_t>(blockIdx.x - num_tokens) * kPadRowsPerBlock;
    Vec<T, VEC> zero;
    zero.clear();
    for (int r = 0; r < kPadRowsPerBlock; ++r) {
      const int64_t row = first + r;
      if (row >= num_rows || src[row] >= 0) continue;
      auto* orow = reinterpret_cast<Vec<T, VEC>*>(out + row * hidden);
      for (int j = threadIdx.x; j < vecs; j += blockDim.x) orow[j] = zero;
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) unpermute_kernel(
    const T* __restrict__ y, int64_t y_row_stride, const int* __restrict__ dest, const float* __restrict__ weights,
    T* __restrict__ out, int top_k, int hidden, int num_rows) {
  __shared__ int rows[kMaxTopK];
  __shared__ float wts[kMaxTopK];
  const int64_t t = blockIdx.x;
  for (int k = threadIdx.x; k < top_k; k += blockDim.x) {
    const int d = dest[t * top_k + k];
    rows[k] = (d >= 0 && d < num_rows) ? d : -1;
    wts[k] = weights ? weights[t * top_k + k] : 1.f;
  }
  __syncthreads();
  cutlass::NumericConverter<float, T> to_f;
  cutlass::NumericConverter<T, float> from_f;
  auto* orow = reinterpret_cast<Vec<T, VEC>*>(out + t * hidden);
  for (int j = threadIdx.x; j < hidden / VEC; j += blockDim.x) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
#pragma unroll 4
    for (int k = 0; k < top_k; ++k) {
      const int d = rows[k];
      if (d < 0) continue;
      const Vec<T, VEC> v = reinterpret_cast<const Vec<T, VEC>*>(y + static_cast<int64_t>(d) * y_row_stride)[j];
      const float w = wts[k];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += w * to_f(v[i]);
    }
    Vec<T, VEC> r;
#pragma unroll
    for (int i = 0; i < VEC; ++i) r[i] = from_f(acc[i]);
    orow[j] = r;
  }
}

// Slots per pass of slot_dot: their rows' loads are in flight together (one 16-byte vector each per thread).
constexpr int kSlotsPerPass = 8;
constexpr int kWarps = kThreads / 32;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) slot_dot_kernel(
    const T* __restrict__ rows, int64_t rows_stride, const int* __restrict__ dest, const T* __restrict__ tokens,
    int64_t tokens_stride, float* __restrict__ out, int top_k, int hidden, int num_rows) {
  __shared__ int slot_row[kMaxTopK];
  __shared__ float warp_sums[kWarps][kMaxTopK];
  const int64_t t = blockIdx.x;
  for (int k = threadIdx.x; k < top_k; k += blockDim.x) {
    const int d = dest[t * top_k + k];
    slot_row[k] = (d >= 0 && d < num_rows) ? d : -1;
  }
  __syncthreads();
  cutlass::NumericConverter<float, T> to_f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto* tok = reinterpret_cast<const Vec<T, VEC>*>(tokens + t * tokens_stride);
  for (int k0 = 0; k0 < top_k; k0 += kSlotsPerPass) {
    float acc[kSlotsPerPass];
#pragma unroll
    for (int s = 0; s < kSlotsPerPass; ++s) acc[s] = 0.f;
    for (int j = threadIdx.x; j < hidden / VEC; j += blockDim.x) {
      const Vec<T, VEC> x = tok[j];
#pragma unroll
      for (int s = 0; s < kSlotsPerPass; ++s) {
        const int d = k0 + s < top_k ? slot_row[k0 + s] : -1;
        if (d < 0) continue;
        const Vec<T, VEC> r = reinterpret_cast<const Vec<T, VEC>*>(rows + static_cast<int64_t>(d) * rows_stride)[j];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[s] += to_f(r[i]) * to_f(x[i]);
      }
    }
#pragma unroll
    for (int s = 0; s < kSlotsPerPass; ++s) {
      float v = acc[s];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && k0 + s < top_k) warp_sums[warp][k0 + s] = v;
    }
  }
  __syncthreads();
  for (int k = threadIdx.x; k < top_k; k += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][k];
    out[t * top_k + k] = slot_row[k] >= 0 ? sum : 0.f;
  }
}

// 16-byte vectors when every row start of input and output is 16-byte aligned, else one element at a time.
template <typename T>
bool can_vectorize(const at::Tensor& in, int64_t in_row_stride, const at::Tensor& out) {
  constexpr int vec = 16 / sizeof(T);
  return in.size(-1) % vec == 0 && in_row_stride % vec == 0 &&
         reinterpret_cast<uintptr_t>(in.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
}

// Calls launch(std::integral_constant<int, V>) with V the element count of a 16-byte vector, or 1.
template <typename T, typename Launch>
void with_vector_width(bool vectorize, Launch&& launch) {
  if (vectorize)
    launch(std::integral_constant<int, 16 / sizeof(T)>{});
  else
    launch(std::integral_constant<int, 1>{});
}

void check_routing(const at::Tensor& dest, const at::Tensor& data, const char* data_name, const char* op) {
  check_cuda(dest, op, "dest");
  check_same_device(dest, data, op, "dest", data_name);
  check_dtype(dest, {at::kInt}, op, "dest");
  check_dim(dest, 2, op, "dest", "[num_tokens, top_k]");
  check_contiguous(dest, op, "dest");
  KEYE_CHECK(dest.size(1) >= 1 && dest.size(1) <= kMaxTopK, "keye.", op, ": top_k (dest.size(1)) must be in [1, ",
              kMaxTopK, "], got ", dest.size(1));
}

// A float [rows, hidden] operand whose rows are unit-stride along hidden.
void check_float_rows(const at::Tensor& t, const char* op, const char* name, const char* layout) {
  check_cuda(t, op, name);
  check_dtype(t, {at::kBFloat16, at::kHalf, at::kFloat}, op, name);
  check_dim(t, 2, op, name, layout);
  check_row_major_rows(t, op, name);
}

// Optional per-slot factors [T, K] of any float dtype, returned as contiguous fp32 (or undefined).
at::Tensor slot_factors(const std::optional<at::Tensor>& f, const at::Tensor& dest, const char* op,
                        const char* name) {
  if (!f.has_value() || !f->defined()) return at::Tensor();
  check_cuda(*f, op, name);
  check_same_device(*f, dest, op, name, "dest");
  check_dtype(*f, {at::kFloat, at::kBFloat16, at::kHalf}, op, name);
  KEYE_CHECK(f->sizes() == dest.sizes(), "keye.", op, ": argument '", name, "' must have the shape of 'dest' ",
              dims_str(dest.sizes()), ", got ", dims_str(f->sizes()));
  return f->to(at::kFloat).contiguous();
}

}  // namespace

at::Tensor moe_permute_cuda(const at::Tensor& x, const at::Tensor& dest, const at::Tensor& src,
                            const std::optional<at::Tensor>& scale) {
  const char* op = "moe_permute";
  check_float_rows(x, op, "x", "[num_tokens, hidden]");
  check_routing(dest, x, "x", op);
  check_size(dest, 0, x.size(0), op, "dest", "num_tokens (x.size(0))");
  check_cuda(src, op, "src");
  check_same_device(src, x, op, "src", "x");
  check_dtype(src, {at::kInt}, op, "src");
  check_dim(src, 1, op, "src", "[num_rows]");
  check_contiguous(src, op, "src");
  KEYE_CHECK(src.size(0) >= dest.numel(), "keye.moe_permute: 'src' has ", src.size(0),
              " rows but must have at least num_tokens * top_k = ", dest.numel());
  const at::Tensor sc = slot_factors(scale, dest, op, "scale");
  const int64_t num_rows = src.size(0);
  check_index_range(dest, -1, num_rows - 1, op, "dest");
  check_index_range(src, -1, dest.numel() - 1, op, "src");

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({num_rows, x.size(1)}, x.options());
  const int64_t T = x.size(0), K = dest.size(1), H = x.size(1);
  const int64_t pad_blocks = (num_rows + kPadRowsPerBlock - 1) / kPadRowsPerBlock;
  if (T + pad_blocks == 0 || H == 0) return out;
  KEYE_CHECK(T + pad_blocks < (int64_t(1) << 31), "keye.moe_permute: too many tokens (", T, ")");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t row_stride = T > 1 ? x.stride(0) : H;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_permute", [&] {
    using T_ = typename CutlassType<scalar_t>::type;
    const auto* xp = reinterpret_cast<const T_*>(x.data_ptr());
    auto* op_ = reinterpret_cast<T_*>(out.data_ptr());
    const float* sp = sc.defined() ? sc.data_ptr<float>() : nullptr;
    const dim3 grid(static_cast<unsigned>(T + pad_blocks));
    with_vector_width<scalar_t>(can_vectorize<scalar_t>(x, row_stride, out), [&](auto vec) {
      permute_kernel<T_, decltype(vec)::value><<<grid, kThreads, 0, stream>>>(
          xp, row_stride, dest.data_ptr<int>(), sp, src.data_ptr<int>(), op_, T, K, H, num_rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor moe_unpermute_cuda(const at::Tensor& y, const at::Tensor& dest, const std::optional<at::Tensor>& weights) {
  const char* op = "moe_unpermute";
  check_float_rows(y, op, "y", "[num_rows, hidden]");
  check_routing(dest, y, "y", op);
  const at::Tensor w = slot_factors(weights, dest, op, "weights");
  const int64_t num_rows = y.size(0);
  check_index_range(dest, -1, num_rows - 1, op, "dest");

  c10::cuda::CUDAGuard guard(y.device());
  const int64_t T = dest.size(0), K = dest.size(1), H = y.size(1);
  at::Tensor out = at::empty({T, H}, y.options());
  if (T == 0 || H == 0) return out;
  KEYE_CHECK(T < (int64_t(1) << 31), "keye.moe_unpermute: too many tokens (", T, ")");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t row_stride = num_rows > 1 ? y.stride(0) : H;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute", [&] {
    using T_ = typename CutlassType<scalar_t>::type;
    const auto* yp = reinterpret_cast<const T_*>(y.data_ptr());
    auto* op_ = reinterpret_cast<T_*>(out.data_ptr());
    const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
    with_vector_width<scalar_t>(can_vectorize<scalar_t>(y, row_stride, out), [&](auto vec) {
      unpermute_kernel<T_, decltype(vec)::value><<<T, kThreads, 0, stream>>>(
          yp, row_stride, dest.data_ptr<int>(), wp, op_, K, H, num_rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor moe_slot_dot_cuda(const at::Tensor& rows, const at::Tensor& dest, const at::Tensor& tokens) {
  const char* op = "moe_slot_dot";
  check_float_rows(rows, op, "rows", "[num_rows, hidden]");
  check_routing(dest, rows, "rows", op);
  check_float_rows(tokens, op, "tokens", "[num_tokens, hidden]");
  check_same_device(tokens, rows, op, "tokens", "rows");
  KEYE_CHECK(tokens.scalar_type() == rows.scalar_type(), "keye.moe_slot_dot: 'tokens' must have the dtype of 'rows' (",
             dtype_name(rows.scalar_type()), "), got ", dtype_name(tokens.scalar_type()));
  check_size(tokens, 0, dest.size(0), op, "tokens", "num_tokens (dest.size(0))");
  check_size(tokens, 1, rows.size(1), op, "tokens", "hidden (rows.size(1))");
  const int64_t num_rows = rows.size(0);
  check_index_range(dest, -1, num_rows - 1, op, "dest");

  c10::cuda::CUDAGuard guard(rows.device());
  const int64_t T = dest.size(0), K = dest.size(1), H = rows.size(1);
  at::Tensor out = at::empty({T, K}, rows.options().dtype(at::kFloat));  // every slot is written
  if (T == 0 || H == 0) return out;
  KEYE_CHECK(T < (int64_t(1) << 31), "keye.moe_slot_dot: too many tokens (", T, ")");
  const int64_t rows_stride = num_rows > 1 ? rows.stride(0) : H;
  const int64_t tokens_stride = T > 1 ? tokens.stride(0) : H;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "moe_slot_dot", [&] {
    using T_ = typename CutlassType<scalar_t>::type;
    const bool vectorize =
        can_vectorize<scalar_t>(rows, rows_stride, tokens) && tokens_stride % (16 / sizeof(scalar_t)) == 0;
    with_vector_width<scalar_t>(vectorize, [&](auto vec) {
      slot_dot_kernel<T_, decltype(vec)::value><<<T, kThreads, 0, stream>>>(
          reinterpret_cast<const T_*>(rows.data_ptr()), rows_stride, dest.data_ptr<int>(),
          reinterpret_cast<const T_*>(tokens.data_ptr()), tokens_stride, out.data_ptr<float>(), K, H, num_rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace keye
