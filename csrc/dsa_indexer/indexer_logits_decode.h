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
};

void indexer_logits_decode_narrow(int H, int D, const DecodeLogitsArgs& p, int num_tiles, int num_seqs,
                                  cudaStream_t stream);

}  // namespace keye
