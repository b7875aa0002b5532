// DSA lightning indexer: FP8 scores, per-row top-k selection, the paged index-key cache and the fused
// Hadamard rotation + FP8 quantisation. Semantics: keye/ops/reference/dsa_indexer.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace keye {

// out[r, s] = k_scale[s] * sum_h coef[r, h] * ReLU(q8[r, h] . k8[s]) with coef = w * D^-0.5 * q_scale (fp32), for
// every key s <= q_pos0 + r (query row r sits at position q_pos0 + r of the keys' sequence); entries right of that
// are left unspecified. q8 [R, H, D] fp8, q_scale [R, H] fp32, w [R, H] fp32/bf16/fp16, k8 [N, D] fp8, k_scale [N]
// fp32, out [R, >= q_pos0 + R].
void indexer_logits_cuda(const at::Tensor& q8, const at::Tensor& q_scale, const at::Tensor& w, const at::Tensor& k8,
                         const at::Tensor& k_scale, int64_t q_pos0, const at::Tensor& out);

// Scores per group maximum (group_max below): the maximum of every kScoreGroupKeys consecutive scores of a row.
constexpr int kScoreGroupKeys = 8;

// The same against the paged cache: query (b, j) of q8 [B, n, H, D] sits at position seq_lens[b] - n + j and row
// b * n + j of out [B * n, >= max_pages * 64]. k_cache [P, 64, D] fp8, k_scale_cache [P, 64] fp32, block_table
// [B, max_pages] int32, seq_lens [B] int32. group_max (optional, only with n * H <= 16: the streaming kernel),
// [B * n, >= max_pages * 64 / kScoreGroupKeys] fp32: column j of row r gets the maximum of out[r, 8j .. 8j + 7]
// over the keys below seq_lens[b] (as fmaxf takes it: NaN only if all are NaN; -inf where there are none); columns
// past the sequence's last page are left unspecified.
void indexer_logits_paged_cuda(const at::Tensor& q8, const at::Tensor& q_scale, const at::Tensor& w,
                               const at::Tensor& k_cache, const at::Tensor& k_scale_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& out,
                               const std::optional<at::Tensor>& group_max);

// Scores and selection in one op, for at most 16 (query, head) columns per sequence (the streaming kernel): the
// scores of every row into scores (as indexer_logits_paged writes out), and per row the selection topk_rows makes
// of them (lengths as in indexer_topk_decode: query j of sequence b sees seq_lens[b] - n + 1 + j keys) written to
// indices [B * n, topk] int32 (positions, ascending) and optionally out_scores. Each CTA of the score kernel also
// lists its candidates (the keys at or above a bound it picks from its own scores, indexer_logits_decode.h), and one
// CTA per row selects from the lists, re-reading from scores only the units whose bound turns out to lie above the
// row's threshold (topk_lists.cu).
void indexer_topk_paged_cuda(const at::Tensor& q8, const at::Tensor& q_scale, const at::Tensor& w,
                             const at::Tensor& k_cache, const at::Tensor& k_scale_cache, const at::Tensor& block_table,
                             const at::Tensor& seq_lens, int64_t topk, const at::Tensor& scores,
                             const at::Tensor& indices, const std::optional<at::Tensor>& out_scores);

// Per row r of scores [R, ld] fp32: the min(topk, lengths[r]) highest of its first lengths[r] entries (ties to the
// lower column, NaN counts as -inf, -0.0 as +0.0), written in ascending column order (+ index_offset) to
// indices [R, topk] int32, then -1; optionally their scores to out_scores [R, topk] (-inf in empty slots).
// group_max (optional) [R, >= ceil(cols / kScoreGroupKeys)] fp32, as indexer_logits_paged writes it: the maximum
// of every whole group of kScoreGroupKeys columns below lengths[r] (other columns are not read). With it the search
// is bounded by the maxima (one kernel, a fraction of each row read); a wrong maximum gives a wrong selection.
void topk_rows_cuda(const at::Tensor& scores, const at::Tensor& lengths, int64_t topk, int64_t index_offset,
                    const at::Tensor& indices, const std::optional<at::Tensor>& out_scores,
                    const std::optional<at::Tensor>& group_max);

// Token i of k8 [N, D] / k_scale [N] goes to cache slot slot_mapping[i] (page * 64 + offset); -1 skips it.
// positions [B, ...] int32 within each sequence (-1 = empty) -> cache slots block_table[b, p / 64] * 64 + p % 64.
at::Tensor paged_slots_cuda(const at::Tensor& positions, const at::Tensor& block_table);

void indexer_cache_append_cuda(const at::Tensor& k8, const at::Tensor& k_scale, const at::Tensor& k_cache,
                               const at::Tensor& k_scale_cache, const at::Tensor& slot_mapping);

// Orthonormal Hadamard over the last dim (D in {32, 64, 128}) then e4m3 with one ue8m0 scale per row.
std::tuple<at::Tensor, at::Tensor> indexer_rotate_quantize_cuda(const at::Tensor& x);

}  // namespace keye
