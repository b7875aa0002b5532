// Helpers shared by the decode GEMV kernels (decode_gemv.cu, decode_streamk.cu, decode_fused.cu).
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>

#include <climits>
#include <cstdint>

#include "common/check.h"

namespace keye {
namespace decode {

constexpr int kVecCols = 8;  // bf16 columns per 16-byte load

// Whether every row of the contiguous bf16 activations a [rows, I] starts 16-byte aligned, so that the down kernels
// can stage them with 16-byte loads (host side).
inline bool activation_rows_aligned(const at::Tensor& a) {
  return a.size(1) % kVecCols == 0 && reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0;
}

// Argument checks shared by the decode launchers (decode_gemv.cu, decode_fused.cu).
inline void check_decode_ids(const at::Tensor& ids, const at::Tensor& ref, const char* ref_name, int64_t experts,
                             const char* op) {
  check_cuda(ids, op, "ids");
  check_same_device(ids, ref, op, "ids", ref_name);
  check_dtype(ids, {at::kInt}, op, "ids");
  check_dim(ids, 2, op, "ids", "[T, top_k]");
  check_contiguous(ids, op, "ids");
  KEYE_CHECK(ids.size(1) >= 1, "keye.", op, ": top_k must be >= 1, got ", ids.size(1));
  KEYE_CHECK(ids.numel() <= 65535, "keye.", op, ": at most 65535 (token, expert) slots (one grid row each), got ",
             ids.numel(), "; larger batches belong on the grouped GEMMs (keye.ops.moe picks them)");
  check_index_range(ids, -1, experts - 1, op, "ids");
}

// An expert weight tensor `name` [E, reduction, cols]: bf16, contiguous, 16-byte aligned.
inline void check_weights(const at::Tensor& w, const char* name, const at::Tensor& ref, const char* ref_name,
                          int64_t reduction, const char* op, const char* layout) {
  check_cuda(w, op, name);
  check_same_device(w, ref, op, name, ref_name);
  check_dtype(w, {at::kBFloat16}, op, name);
  check_dim(w, 3, op, name, layout);
  check_contiguous(w, op, name);
  check_size(w, 1, reduction, op, name, "the activation width");
  KEYE_CHECK(w.size(1) < INT_MAX / 2 && w.size(2) < INT_MAX / 2, "keye.", op, ": weight sizes must be below 2^30");
  KEYE_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0, "keye.", op, ": argument '", name,
             "' must be 16-byte aligned (its data pointer)");
}

// Routing weights: fp32 [T, top_k] like ids, on ref's device.
inline void check_routing_weights(const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& ref,
                                  const char* ref_name, const char* op) {
  check_cuda(weights, op, "weights");
  check_same_device(weights, ref, op, "weights", ref_name);
  check_dtype(weights, {at::kFloat}, op, "weights");
  check_contiguous(weights, op, "weights");
  KEYE_CHECK(weights.sizes() == ids.sizes(), "keye.", op, ": argument 'weights' must have the shape of 'ids' ",
             dims_str(ids.sizes()), ", got ", dims_str(weights.sizes()));
}

inline void check_rows_input(const at::Tensor& x, const char* op, const char* name, const char* layout) {
  check_cuda(x, op, name);
  check_dtype(x, {at::kBFloat16}, op, name);
  check_dim(x, 2, op, name, layout);
  check_contiguous(x, op, name);
}

// The row-streaming layout of the 256-thread kernels: 8 lanes per weight row (64 columns, 128 bytes), 32 rows per
// load round, batches of 8 rounds (one 16-byte load per thread each), the next batch's loads issued before the
// current batch is used.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecs = 8;                          // lanes per weight row
constexpr int kRowLanes = kThreads / kVecs;       // rows per load round
constexpr int kDepth = 8;                         // 16-byte weight loads per thread per batch
constexpr int kBatchRows = kRowLanes * kDepth;    // reduction rows one batch of loads covers

__device__ __forceinline__ void fma_vec(float (&acc)[kVecCols], float xv, const uint4& raw) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] = fmaf(xv, f.x, acc[2 * i]);
    acc[2 * i + 1] = fmaf(xv, f.y, acc[2 * i + 1]);
  }
}

// Sum this thread's kVecCols columns over all weight rows of the CTA (lanes with the same vec, then warps in index
// order) into part[c] for the CTA's kLaneVecs * kVecCols columns. Fixed order: deterministic. (gate_up and down)
template <int kLaneVecs, int kNumWarps>
__device__ void reduce_rows(float (&acc)[kVecCols], float (*red)[kLaneVecs * kVecCols], float* part) {
#pragma unroll
  for (int off = kLaneVecs; off < 32; off <<= 1)
#pragma unroll
    for (int j = 0; j < kVecCols; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane < kLaneVecs)
#pragma unroll
    for (int j = 0; j < kVecCols; ++j) red[warp][lane * kVecCols + j] = acc[j];
  __syncthreads();
  if (threadIdx.x < kLaneVecs * kVecCols) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) s += red[w][threadIdx.x];
    part[threadIdx.x] = s;
  }
  __syncthreads();
}

}  // namespace decode
}  // namespace keye
