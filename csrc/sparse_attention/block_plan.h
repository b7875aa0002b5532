// The work plan of the block forward kernel (sparse_attention_fwd_blocks.cu), built on the device from the index
// lists: for each block of 16 adjacent queries, the rows that all of them selected (the common set; gathered once
// per block and used by all 16 queries), and for each pair of queries the rest of their rows.
//
// Why: in real DSA selections neighbouring queries share most of their keys (the recent window, anchor blocks),
// so gathering a shared row once for 16 queries instead of once per pair cuts the gather traffic that bounds the
// kernel. Lists that are not sorted (valid rows strictly increasing, empty slots last) get no common set; their
// rows all go to the pair lists, as they are (a row listed twice is attended twice, as in the pair kernel).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "sparse_attention/work_list.cuh"

namespace keye {
namespace sparse_attention {

constexpr int kBlockQueries = 16;
constexpr int kBlockPairs = kBlockQueries / 2;
// The block kernels (forward and backward): one warp per query pair of the block.
constexpr int kBlockWarps = kBlockPairs;
constexpr int kBlockThreads = 32 * kBlockWarps;

// Slots per pair list: up to K rows of each query in 16-row tiles, the two queries' tiles alternating.
__host__ __device__ constexpr int pair_stride(int k) { return 32 * ((k + 15) / 16); }

struct BlockPlan {
  const int* common;      // [blocks, K]: rows all the block's queries selected, ascending, kSeenLo | kSeenHi set
  const int* common_len;  // [blocks]
  // [pairs, pair_stride(K)]: the pair's other rows; tile 2j (16 slots) holds query a's rows 16j..16j+15 (kSeenLo),
  // tile 2j + 1 query b's (kSeenHi); -1 pads the shorter list. One query per tile: the forward's phase 2 attends to
  // a tile with that query's heads only (attend_own_tile); kernels that take a tile for the pair's 16 heads see
  // half of them masked, as with any layout that does not merge the two lists.
  const int* pair_work;
  const int* pair_len;  // [pairs]: slots in use (a multiple of 32)
  int num_idx;          // K
};

// Builds the plan for ix (one split: ix.num_idx <= kMaxChunk) on `stream`; the returned tensor owns the buffers
// that `plan` points into (keep it alive until the kernels that read the plan are enqueued).
at::Tensor build_block_plan(const IndexParams& ix, const at::Tensor& like, cudaStream_t stream, BlockPlan& plan);

// Launches a kernel over the plan's blocks: one CTA of `threads` per (block of 16 queries, KV head), with `smem`
// bytes of dynamic shared memory. Params: the kernel's parameters (FwdParams or BwdParams).
template <typename Params>
void launch_over_blocks(void (*kernel)(Params, BlockPlan), const Params& p, const BlockPlan& plan, int threads,
                        int smem, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.ix.num_queries + kBlockQueries - 1) / kBlockQueries),
                  static_cast<unsigned>(p.heads_kv));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, threads, smem, stream>>>(p, plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sparse_attention
}  // namespace keye
