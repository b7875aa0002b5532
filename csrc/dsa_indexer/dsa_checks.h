// Argument checks shared by the DSA indexer ops (messages match keye/ops/reference/dsa_indexer.py's).
#pragma once

#include <ATen/ATen.h>

#include "common/check.h"

#include <cstdint>
#include <initializer_list>
#include <optional>

namespace keye {

// A contiguous CUDA tensor of one of `dtypes` with `dim` dims, on ref's device.
inline void check_dense(const at::Tensor& t, const at::Tensor& ref, const char* ref_name,
                        std::initializer_list<at::ScalarType> dtypes, int64_t dim, const char* op, const char* name,
                        const char* layout) {
  check_cuda(t, op, name);
  check_same_device(t, ref, op, name, ref_name);
  check_dtype(t, dtypes, op, name);
  check_dim(t, dim, op, name, layout);
  check_contiguous(t, op, name);
}

// fp32 rows the kernels read or write with 16-byte vectors: unit inner stride, row stride a multiple of 4,
// 16-byte aligned start.
inline void check_float4_rows(const at::Tensor& t, const char* op, const char* name) {
  check_row_major_rows(t, op, name);
  KEYE_CHECK(t.stride(0) % 4 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "keye.", op,
             ": argument '", name, "' must be 16-byte aligned with a row stride that is a multiple of 4, got strides ",
             dims_str(t.strides()));
}

// A selection's outputs: indices [rows, topk] int32 and optionally out_scores of the same shape, fp32, contiguous,
// on ref's device. Returns out_scores' data (null without it).
inline float* check_selection_out(const at::Tensor& indices, const std::optional<at::Tensor>& out_scores, int64_t rows,
                                  int64_t topk, const at::Tensor& ref, const char* ref_name, const char* op,
                                  const char* layout) {
  check_dense(indices, ref, ref_name, {at::kInt}, 2, op, "indices", layout);
  KEYE_CHECK(indices.size(0) == rows && indices.size(1) == topk, "keye.", op, ": argument 'indices' must have shape [",
             rows, ", ", topk, "], got ", dims_str(indices.sizes()));
  if (!out_scores.has_value()) return nullptr;
  check_dense(*out_scores, ref, ref_name, {at::kFloat}, 2, op, "out_scores", layout);
  KEYE_CHECK(out_scores->sizes() == indices.sizes(), "keye.", op, ": argument 'out_scores' must have shape ",
             dims_str(indices.sizes()), ", got ", dims_str(out_scores->sizes()));
  return out_scores->data_ptr<float>();
}

// The kernels move q and key rows in 16-byte pieces (vector loads, bulk copies): a view at an odd offset would
// fault.
inline void check_aligned16(const at::Tensor& t, const char* op, const char* name) {
  KEYE_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "keye.", op, ": argument '", name,
             "' must start on a 16-byte boundary (the kernels copy it in 16-byte pieces); it is a view at an "
             "unaligned offset, pass a copy");
}

inline bool indexer_heads_ok(int64_t h) { return h == 4 || h == 8 || h == 16 || h == 32 || h == 64; }
inline bool indexer_dim_ok(int64_t d) { return d == 32 || d == 64 || d == 128; }

// q8 [..., H_I, D_I] fp8 contiguous (dim = 3 for prefill rows, 4 for [B, n, ...]), q_scale [..., H_I] fp32 and
// w [..., H_I] fp32/bf16/fp16, contiguous.
inline void check_indexer_queries(const at::Tensor& q8, const at::Tensor& q_scale, const at::Tensor& w, int64_t dim,
                                  const char* op) {
  check_cuda(q8, op, "q8");
  check_dtype(q8, {at::kFloat8_e4m3fn}, op, "q8");
  check_dim(q8, dim, op, "q8", dim == 3 ? "[T, H_I, D_I]" : "[B, n, H_I, D_I]");
  const int64_t H = q8.size(-2), D = q8.size(-1);
  KEYE_CHECK(indexer_heads_ok(H), "keye.", op, ": H_I (q8.size(", dim - 2, ")) must be one of (4, 8, 16, 32, 64), got ",
             H);
  KEYE_CHECK(indexer_dim_ok(D), "keye.", op, ": D_I (q8.size(", dim - 1, ")) must be one of (32, 64, 128), got ", D);
  check_contiguous(q8, op, "q8");
  auto per_head = [&](const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> dtypes) {
    check_cuda(t, op, name);
    check_same_device(t, q8, op, name, "q8");
    check_dtype(t, dtypes, op, name);
    KEYE_CHECK(t.sizes() == q8.sizes().slice(0, dim - 1), "keye.", op, ": argument '", name, "' must have shape ",
               dims_str(q8.sizes().slice(0, dim - 1)), ", got ", dims_str(t.sizes()));
    check_contiguous(t, op, name);
  };
  per_head(q_scale, "q_scale", {at::kFloat});
  per_head(w, "w", {at::kFloat, at::kBFloat16, at::kHalf});
}

// k_cache [pages, 64, D_I] fp8 and k_scale_cache [pages, 64] fp32, contiguous, on ref's device, D_I matching.
inline void check_indexer_cache(const at::Tensor& k_cache, const at::Tensor& k_scale_cache, const at::Tensor& ref,
                                const char* ref_name, const char* op) {
  const int64_t D = ref.size(-1);
  check_dense(k_cache, ref, ref_name, {at::kFloat8_e4m3fn}, 3, op, "k_cache", "[num_pages, 64, D_I]");
  KEYE_CHECK(k_cache.size(1) == 64 && k_cache.size(2) == D, "keye.", op, ": 'k_cache' must have shape [num_pages, 64, ",
             D, "], got ", dims_str(k_cache.sizes()));
  check_dense(k_scale_cache, ref, ref_name, {at::kFloat}, 2, op, "k_scale_cache", "[num_pages, 64]");
  KEYE_CHECK(k_scale_cache.size(0) == k_cache.size(0) && k_scale_cache.size(1) == 64, "keye.", op,
             ": 'k_scale_cache' must have shape [", k_cache.size(0), ", 64], got ", dims_str(k_scale_cache.sizes()));
}

// An int32 tensor of `dim` dims on ref's device whose dim 0 is the batch.
inline void check_int32_batch(const at::Tensor& t, int64_t dim, int64_t batch, const at::Tensor& ref, const char* op,
                              const char* name, const char* layout) {
  check_cuda(t, op, name);
  check_same_device(t, ref, op, name, "q8");
  check_dtype(t, {at::kInt}, op, name);
  check_dim(t, dim, op, name, layout);
  check_size(t, 0, batch, op, name, "the batch (q8.size(0))");
  check_row_major_rows(t, op, name);
}

}  // namespace keye
