// The decode selection from the streaming score kernel's candidate lists (topk_lists.cu), launched by
// indexer_topk_paged_cuda after that kernel; arguments are checked there.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace keye {

struct ListRows {
  const float* scores;      // [B * n, >= cols] as the score kernel wrote them (read for units and rows the lists miss)
  int64_t ld;
  int cols;                 // max_pages * 64
  const int* seq_lens;      // [B]: row b * n + j has seq_lens[b] - n + 1 + j keys (clamped to [0, cols])
  int rows_per_seq;         // n
  const uint2* cand;        // DecodeLogitsArgs::cand and friends (indexer_logits_decode.h)
  const int* cand_count;
  const uint32_t* cand_bound;
  int units;                // per row
  int keys_per_unit;        // tiles_per_cta * 64
  int topk;
  int* indices;             // [B * n, topk]: positions in ascending order, then -1
  float* out_scores;        // null or [B * n, topk]
};

void launch_topk_lists(const ListRows& a, int64_t rows, cudaStream_t stream);

}  // namespace keye
