// Routing metadata for the MoE permutation, in four small launches and no host sync:
//   1. count:       one warp per chunk of kChunk flat (token, slot) entries builds a per-expert histogram;
//   2. chunk scan:  one block per expert scans its column of chunk counts (each chunk's first rank);
//   3. expert scan: one block pads each expert's total to `align` and scans them into offsets;
//   4. assign:      one warp per chunk walks its entries in order and gives each its row.
// Rows within an expert are ordered by flat index t*K + k, so the result is deterministic and equal
// to a stable sort by expert id.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_scan.cuh>

#include "common/check.h"
#include "moe_permute/moe_permute.h"

namespace keye {
namespace {

constexpr int kChunk = 256;           // flat entries per warp (8 steps of 32)
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxExperts = 1024;     // one thread per expert in the expert scan
constexpr int kScanThreads = 256;

template <typename IdT>
__device__ __forceinline__ int load_expert(const IdT* ids, int64_t flat, int64_t n, int num_experts) {
  if (flat >= n) return -1;
  const int64_t e = static_cast<int64_t>(ids[flat]);
  return (e >= 0 && e < num_experts) ? static_cast<int>(e) : -1;  // anything else is "not routed"
}

template <typename IdT>
__global__ void count_kernel(const IdT* __restrict__ ids, int64_t n, int num_experts, int num_chunks,
                             int* __restrict__ counts) {
  extern __shared__ int smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (chunk >= num_chunks) return;
  int* hist = smem + warp * num_experts;
  for (int e = lane; e < num_experts; e += 32) hist[e] = 0;
  __syncwarp();
  for (int i = 0; i < kChunk; i += 32) {
    const int e = load_expert(ids, chunk * kChunk + i + lane, n, num_experts);
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && lane == __ffs(peers) - 1) hist[e] += __popc(peers);  // one writer per expert
    __syncwarp();
  }
  for (int e = lane; e < num_experts; e += 32) counts[chunk * num_experts + e] = hist[e];
}

// One block per expert: exclusive prefix of its column of chunk counts (in place) and its total.
__global__ void __launch_bounds__(kScanThreads) chunk_scan_kernel(int* __restrict__ counts, int num_chunks,
                                                                  int num_experts, int* __restrict__ totals) {
  using BlockScan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename BlockScan::TempStorage storage;
  __shared__ int carry;
  const int e = blockIdx.x;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < num_chunks; base += kScanThreads) {
    const int c = base + threadIdx.x;
    int* p = counts + static_cast<int64_t>(c) * num_experts + e;
    const int v = c < num_chunks ? *p : 0;
    int prefix, tile_sum;
    BlockScan(storage).ExclusiveSum(v, prefix, tile_sum);
    if (c < num_chunks) *p = carry + prefix;
    __syncthreads();  // everyone has read `carry` and the scan storage before they change
    if (threadIdx.x == 0) carry += tile_sum;
    __syncthreads();
  }
  if (threadIdx.x == 0) totals[e] = carry;
}

// One block: pad each expert's total to `align` and scan over experts -> offsets[0..E].
__global__ void __launch_bounds__(kMaxExperts) expert_scan_kernel(const int* __restrict__ totals, int num_experts,
                                                                  int align, int* __restrict__ offsets) {
  using BlockScan = cub::BlockScan<int, kMaxExperts>;
  __shared__ typename BlockScan::TempStorage storage;
  const int e = threadIdx.x;
  const int padded = e < num_experts ? (totals[e] + align - 1) / align * align : 0;
  int start;
  BlockScan(storage).ExclusiveSum(padded, start);
  if (e < num_experts) offsets[e] = start;
  if (e == num_experts - 1) offsets[num_experts] = start + padded;
}

template <typename IdT>
__global__ void assign_kernel(const IdT* __restrict__ ids, int64_t n, int num_experts, int num_chunks,
                              const int* __restrict__ chunk_prefix, const int* __restrict__ offsets,
                              int* __restrict__ dest, int* __restrict__ src) {
  extern __shared__ int smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (chunk >= num_chunks) return;
  int* next_row = smem + warp * num_experts;
  for (int e = lane; e < num_experts; e += 32) next_row[e] = offsets[e] + chunk_prefix[chunk * num_experts + e];
  __syncwarp();
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int i = 0; i < kChunk; i += 32) {
    const int64_t flat = chunk * kChunk + i + lane;
    const int e = load_expert(ids, flat, n, num_experts);
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0) {
      const int row = next_row[e] + __popc(peers & lanes_below);
      dest[flat] = row;
      src[row] = static_cast<int>(flat);
    } else if (flat < n) {
      dest[flat] = -1;
    }
    __syncwarp();
    if (e >= 0 && (peers & lanes_below) == 0) next_row[e] += __popc(peers);
    __syncwarp();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& topk_ids, int64_t num_experts,
                                                              int64_t align) {
  const char* op = "moe_route";
  check_cuda(topk_ids, op, "topk_ids");
  check_dtype(topk_ids, {at::kInt, at::kLong}, op, "topk_ids");
  check_dim(topk_ids, 2, op, "topk_ids", "[num_tokens, top_k]");
  check_contiguous(topk_ids, op, "topk_ids");
  KEYE_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "keye.moe_route: argument 'num_experts' must be an int in [1, ",
              kMaxExperts, "], got ", num_experts);
  KEYE_CHECK(align >= 1 && align <= 1024, "keye.moe_route: argument 'align' must be an int in [1, 1024], got ", align);
  const int64_t n = topk_ids.numel();
  const int64_t num_rows = n + (align > 1 ? num_experts * (align - 1) : 0);
  KEYE_CHECK(num_rows < (int64_t(1) << 31), "keye.moe_route: ", n,
              " routed slots (plus padding) exceed the int32 row index range");
  check_index_range(topk_ids, -1, num_experts - 1, op, "topk_ids");

  c10::cuda::CUDAGuard guard(topk_ids.device());
  auto opts = topk_ids.options().dtype(at::kInt);
  at::Tensor dest = at::empty(topk_ids.sizes(), opts);
  at::Tensor src = at::full({num_rows}, -1, opts);
  at::Tensor offsets = at::empty({num_experts + 1}, opts);
  const int num_chunks = static_cast<int>((n + kChunk - 1) / kChunk);
  at::Tensor counts = at::empty({std::max(num_chunks, 1), num_experts}, opts);
  at::Tensor totals = at::empty({num_experts}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int E = static_cast<int>(num_experts);
  const int blocks = (num_chunks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const size_t smem = sizeof(int) * kWarpsPerBlock * E;

  AT_DISPATCH_INDEX_TYPES(topk_ids.scalar_type(), "moe_route", [&] {
    const auto* ids = topk_ids.data_ptr<index_t>();
    if (num_chunks > 0) {
      count_kernel<index_t><<<blocks, 32 * kWarpsPerBlock, smem, stream>>>(ids, n, E, num_chunks,
                                                                           counts.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    chunk_scan_kernel<<<E, kScanThreads, 0, stream>>>(counts.data_ptr<int>(), num_chunks, E,
                                                      totals.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    expert_scan_kernel<<<1, kMaxExperts, 0, stream>>>(totals.data_ptr<int>(), E, static_cast<int>(align),
                                                      offsets.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (num_chunks > 0) {
      assign_kernel<index_t><<<blocks, 32 * kWarpsPerBlock, smem, stream>>>(
          ids, n, E, num_chunks, counts.data_ptr<int>(), offsets.data_ptr<int>(), dest.data_ptr<int>(),
          src.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dest, src, offsets};
}

}  // namespace keye
