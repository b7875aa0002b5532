// Top-k sparse GQA attention (DSA): every query row attends over its own list of K/V rows, shared by all of
// its query heads; keye/ops/sparse_attention.py is the Python entry point.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace keye {

// q [N, Hq, D] bf16, k/v [S, Hkv, D] bf16, indices [N, K] int32 (rows of k/v, or positions added to
// row_base[n] when row_base is given; negative or out-of-range entries are empty slots), splits >= 1 CTAs per
// (query pair, KV head) merged by log-sum-exp; pair_queries: adjacent queries share a CTA (and their common rows)
// when Hq/Hkv <= 8 (off for decode rows that belong to different sequences); share_blocks: with pairs and one
// split, blocks of 16 adjacent queries gather the rows they all selected once (block_plan.h). Returns o [N, Hq, D]
// bf16 and lse [N, Hq] fp32 (natural log of the softmax denominator of scale * q.k; -inf and o = 0 for a query
// without a valid key).
std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& indices,
                                                             const std::optional<at::Tensor>& row_base, double scale,
                                                             int64_t splits, bool pair_queries, bool share_blocks);

// Backward: accumulates into the zero-initialised buffers dq [N, Hq, D], dk and dv [S, Hkv, D] from dout [N, Hq, D]
// bf16, the forward's lse and delta = rowsum(dout * o) - dlse [N, Hq]. Fast mode: fp32 buffers and fp32 atomics.
// Deterministic mode (fixed_scale, fp32 [3], given): int64 buffers holding round(x * fixed_scale[i]) summed with
// integer atomics (bitwise reproducible); fixed_scale must be powers of two that keep every sum below 2^62.
// share_blocks: as the forward's (blocks of 16 queries when queries pair up and one split covers the lists).
void sparse_attention_bwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                               const at::Tensor& indices, const std::optional<at::Tensor>& row_base,
                               const at::Tensor& lse, const at::Tensor& delta, double scale, int64_t splits,
                               const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, bool share_blocks,
                               const std::optional<at::Tensor>& fixed_scale);

// The forward/backward kernels' block plan for indices (block_plan.h; row_base and empty slots as above, K <= 2048),
// for tests and inspection: common [blocks, K] and common_len [blocks] (rows all 16 queries of a block selected,
// ascending, with both seen bits set), pair_work [pairs, 32 ceil(K / 16)] and pair_len [pairs] (each query pair's
// other rows in 16-row tiles, the two queries' tiles alternating, -1 padded).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_attention_block_plan_cuda(
    const at::Tensor& indices, const std::optional<at::Tensor>& row_base, int64_t num_rows);

}  // namespace keye
