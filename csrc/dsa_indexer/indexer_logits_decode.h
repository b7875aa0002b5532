// The narrow paged-decode score kernel (indexer_logits_decode.cu), called by keye.indexer_logits_paged when a
// sequence brings at most 16 (query, head) columns; wider blocks use the shared-memory kernel of
// indexer_logits.cu. Arguments are validated by the op before they get here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dsa_indexer/score_coefficients.cuh"

namespace keye {

struct DecodeLogitsArgs {
  const uint8_t* q;          // [B, n, H, D] fp8 bytes
  ScoreCoefficients coef;    // [B, n, H]
  const uint8_t* k;          // paged cache [P, 64, D]
  const float* k_scale;      // [P, 64]
  const int* block_table;    // [B, max_pages]
  const int* seq_lens;       // [B]
  int64_t bt_stride;
  int max_pages;
  int num_pages;
  int rows_per_seq;          // n, with n * H <= 16
  int tiles_per_cta;         // set by the launcher
  float* out;                // [B * n, >= max_pages * 64]
  int64_t ld;
  int64_t out_cols;
  float* group_max;          // null, or [B * n, >= max_pages * 64 / kScoreGroupKeys] (dsa_indexer.h)
  int64_t gm_ld;
  // Candidate lists (null unless the selection is made from them, topk_lists.cu; exclusive with group_max): per
  // query row and CTA of the sequence's grid (a "unit" of tiles_per_cta pages), a bound (an order key) and every key
  // of the row in the unit whose score's order key reaches it, as (order key, column) pairs in column order. The
  // bound is about the m-th largest of the unit's 8-key group maxima, m a few standard deviations above the share
  // of the row's topk a unit holds on average (decode_list_rank), so that it is usually below the row's threshold.
  uint2* cand;               // [B * n, cand_units, kDecodeListCap]
  int* cand_count;           // [B * n, cand_units]: keys at or above the bound (more than kDecodeListCap: incomplete)
  uint32_t* cand_bound;      // [B * n, cand_units]
  int cand_units;            // CTAs per sequence: ceil(max_pages / tiles_per_cta)
  int topk;
};

// Entries a unit's candidate list holds; a unit with more is re-read from the scores by the selection.
constexpr int kDecodeListCap = 128;
// Units per row the candidate lists aim at: with more, a row's lists (~m of its keys per unit, decode_list_rank) can
// outgrow the selection's shared-memory list (topk_lists.cu), which then selects from the whole row (measured: 8
// rows of 256K keys at 8 pages per unit, 512 units, took 91 us against 80 for the split top-k).
constexpr int kDecodeListUnits = 256;

// Pages per CTA ("unit") of the narrow kernel for num_seqs sequences of num_tiles pages each on this device; with
// candidate lists, enough pages that a row has at most kDecodeListUnits units where the kernel allows it (16 pages).
int decode_tiles_per_cta(int num_tiles, int num_seqs, bool lists);

void indexer_logits_decode_narrow(int H, int D, const DecodeLogitsArgs& p, int num_tiles, int num_seqs,
                                  cudaStream_t stream);

}  // namespace keye
