// Positions within each sequence -> physical slots of the paged caches (page * 64 + offset) through the block
// table, as the decode selection hands them to sparse attention. One kernel instead of the ~12 elementwise ones
// the same arithmetic took in PyTorch (clamp, casts, divide, gather, multiply, modulo, add, where): ~1 us each in a
// decode step's CUDA graph, once per layer.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "common/check.h"
#include "dsa_indexer/dsa_indexer.h"

namespace keye {
namespace {

constexpr int kPageSize = 64;

// positions [B, per_seq] int32 (-1 = empty); table [B, pages] int32 with row stride table_stride. A position past
// the table (only possible with index checks off and bad seq_lens) becomes -1: never a read out of bounds.
__global__ void paged_slots_kernel(const int* __restrict__ positions, const int* __restrict__ table,
                                   int64_t table_stride, int64_t pages, int64_t per_seq, int64_t total,
                                   int* __restrict__ slots) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int p = positions[i];
  const int64_t page = p / kPageSize;
  slots[i] = p < 0 || page >= pages ? -1 : table[(i / per_seq) * table_stride + page] * kPageSize + p % kPageSize;
}

}  // namespace

at::Tensor paged_slots_cuda(const at::Tensor& positions, const at::Tensor& block_table) {
  const char* op = "paged_slots";
  check_cuda(positions, op, "positions");
  check_cuda(block_table, op, "block_table");
  check_same_device(block_table, positions, op, "block_table", "positions");
  check_dtype(positions, {at::kInt}, op, "positions");
  check_dtype(block_table, {at::kInt}, op, "block_table");
  check_dim(block_table, 2, op, "block_table", "[B, max_pages]");
  KEYE_CHECK(positions.dim() >= 1 && positions.size(0) == block_table.size(0), "keye.", op,
             ": argument 'positions' must be [B, ...] with B = block_table.size(0) = ", block_table.size(0),
             ", got shape ", dims_str(positions.sizes()));
  check_row_major_rows(block_table, op, "block_table");
  const at::Tensor pos = positions.contiguous();
  at::Tensor slots = at::empty_like(pos);
  const int64_t total = pos.numel();
  if (total == 0) return slots;
  const c10::cuda::CUDAGuard guard(positions.device());
  const int threads = 256;
  paged_slots_kernel<<<static_cast<unsigned>((total + threads - 1) / threads), threads, 0,
                       c10::cuda::getCurrentCUDAStream()>>>(pos.data_ptr<int>(), block_table.data_ptr<int>(),
                                                            block_table.stride(0), block_table.size(1),
                                                            total / pos.size(0), total, slots.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return slots;
}

}  // namespace keye
