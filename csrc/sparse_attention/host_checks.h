// Host-side argument checks and work-list parameters shared by the sparse-attention forward and backward ops.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common/check.h"
#include "sparse_attention/work_list.cuh"

namespace keye {
namespace sparse_attention {

// A bf16 [rows, heads, D] operand: heads and dims contiguous, row stride a multiple of 8 and below 2^31 elements
// (the gathers scale it to bytes in 32 bits), 16-byte aligned.
inline void check_rows_operand(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name,
                               const char* layout) {
  check_cuda(t, op, name);
  check_same_device(t, q, op, name, "q");
  check_dtype(t, {at::kBFloat16}, op, name);
  check_dim(t, 3, op, name, layout);
  KEYE_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2) && t.stride(0) % 8 == 0 &&
                 t.stride(0) < (int64_t{1} << 31) && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
             "keye.", op, ": argument '", name,
             "' must have contiguous heads and dims, a row stride that is a multiple of 8 and below 2^31, and a "
             "16-byte aligned start, got strides ",
             dims_str(t.strides()));
}

// A contiguous tensor of the given shape and dtype on q's device.
inline void check_accumulator(const at::Tensor& t, const at::Tensor& q, at::IntArrayRef shape, at::ScalarType dtype,
                              const char* op, const char* name) {
  check_cuda(t, op, name);
  check_same_device(t, q, op, name, "q");
  check_dtype(t, {dtype}, op, name);
  KEYE_CHECK(t.sizes() == shape, "keye.", op, ": argument '", name, "' must have shape ", dims_str(shape), ", got ",
             dims_str(t.sizes()));
  check_contiguous(t, op, name);
}

// A contiguous fp32 tensor of the given shape on q's device.
inline void check_fp32(const at::Tensor& t, const at::Tensor& q, at::IntArrayRef shape, const char* op,
                       const char* name) {
  check_accumulator(t, q, shape, at::kFloat, op, name);
}

// row_base (optional): contiguous int32 [N] on like's device, N = like.size(0) (`count` names it in errors);
// returns its data or nullptr.
inline const int* checked_row_base(const std::optional<at::Tensor>& row_base, const at::Tensor& like,
                                   const char* like_name, const char* count, const char* op) {
  if (!row_base) return nullptr;
  const at::Tensor& rb = *row_base;
  check_cuda(rb, op, "row_base");
  check_same_device(rb, like, op, "row_base", like_name);
  check_dtype(rb, {at::kInt}, op, "row_base");
  check_dim(rb, 1, op, "row_base", "[N]");
  check_size(rb, 0, like.size(0), op, "row_base", count);
  check_contiguous(rb, op, "row_base");
  return rb.data_ptr<int>();
}

// Validates q [N, Hq, D], k/v [S, Hkv, D], indices [N, K], row_base [N]?, splits; returns the work-list
// parameters (chunk = index slots per split, rounded to whole 64-slot warp rounds; queries paired per CTA when
// pair_queries and G <= 8) and the splits actually used.
inline IndexParams check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& indices, const std::optional<at::Tensor>& row_base,
                                        int64_t splits, bool pair_queries, int64_t& used_splits) {
  check_rows_operand(q, q, op, "q", "[N, Hq, D]");
  check_rows_operand(k, q, op, "k", "[S, Hkv, D]");
  check_rows_operand(v, q, op, "v", "[S, Hkv, D]");
  const int64_t N = q.size(0), Hq = q.size(1), D = q.size(2), S = k.size(0), Hkv = k.size(1);
  KEYE_CHECK(D == 64 || D == 128, "keye.", op, ": head dim (q.size(2)) must be 64 or 128, got ", D);
  KEYE_CHECK(k.sizes() == v.sizes(), "keye.", op, ": 'k' and 'v' must have the same shape, got ", dims_str(k.sizes()),
             " and ", dims_str(v.sizes()));
  KEYE_CHECK(k.size(2) == D, "keye.", op, ": 'k' has head dim ", k.size(2), " but 'q' has ", D);
  KEYE_CHECK(Hkv >= 1 && Hq % Hkv == 0 && Hq / Hkv <= 16, "keye.", op, ": query heads (", Hq,
             ") must be a multiple of the KV heads (", Hkv, ") with at most 16 per KV head");
  KEYE_CHECK(N < (int64_t{1} << 31), "keye.", op, ": at most 2^31 - 1 queries, got ", N);
  KEYE_CHECK(S <= kRowMask, "keye.", op, ": at most 2^29 - 1 K/V rows, got ", S);
  check_cuda(indices, op, "indices");
  check_same_device(indices, q, op, "indices", "q");
  check_dtype(indices, {at::kInt}, op, "indices");
  check_dim(indices, 2, op, "indices", "[N, K]");
  check_size(indices, 0, N, op, "indices", "the query count (q.size(0))");
  check_row_major_rows(indices, op, "indices");
  const int64_t K = indices.size(1);
  KEYE_CHECK(splits >= 1 && splits <= 1024, "keye.", op, ": 'splits' must be in [1, 1024], got ", splits);
  const int64_t chunk = (K + splits - 1) / splits;
  KEYE_CHECK(chunk <= kMaxChunk, "keye.", op, ": at most ", kMaxChunk, " index slots per split, got K = ", K,
             " over ", splits, " splits");
  IndexParams ix{};
  ix.row_base = checked_row_base(row_base, q, "q", "the query count (q.size(0))", op);
  if (!row_base) check_index_range(indices, -1, S - 1, op, "indices");
  ix.idx = indices.data_ptr<int>();
  ix.idx_stride = indices.stride(0);
  ix.num_idx = static_cast<int>(K);
  ix.num_rows = S;
  ix.num_queries = N;
  ix.pair = pair_queries && Hq / Hkv <= 8 ? 2 : 1;
  ix.chunk = static_cast<int>(std::min<int64_t>(((chunk + 63) / 64) * 64, kMaxChunk));
  used_splits = K == 0 ? 1 : (K + ix.chunk - 1) / ix.chunk;
  return ix;
}

}  // namespace sparse_attention
}  // namespace keye
