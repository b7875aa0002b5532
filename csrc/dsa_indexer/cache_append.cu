// Appends FP8 index keys and their scales to the paged cache ([pages, 64, D] bytes, [pages, 64] fp32).
// One thread per 16-byte chunk of a key; the first chunk's thread also writes the scale. Slot -1 (padding)
// and, when index checks are off, out-of-range slots are skipped, never written out of bounds.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "common/check.h"
#include "dsa_indexer/dsa_checks.h"
#include "dsa_indexer/dsa_indexer.h"

namespace keye {
namespace {

template <typename Slot>
__global__ void cache_append_kernel(const uint4* __restrict__ k8, const float* __restrict__ k_scale,
                                    const Slot* __restrict__ slots, int64_t n, int chunks, int64_t num_slots,
                                    uint4* __restrict__ k_cache, float* __restrict__ k_scale_cache) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * chunks) return;
  const int64_t tok = i / chunks;
  const int chunk = static_cast<int>(i % chunks);
  const int64_t slot = static_cast<int64_t>(slots[tok]);
  if (slot < 0 || slot >= num_slots) return;
  k_cache[slot * chunks + chunk] = k8[tok * chunks + chunk];
  if (chunk == 0) k_scale_cache[slot] = k_scale[tok];
}

}  // namespace

void indexer_cache_append_cuda(const at::Tensor& k8, const at::Tensor& k_scale, const at::Tensor& k_cache,
                               const at::Tensor& k_scale_cache, const at::Tensor& slot_mapping) {
  const char* op = "indexer_cache_append";
  check_dense(k8, k8, "k8", {at::kFloat8_e4m3fn}, 2, op, "k8", "[N, D_I]");
  KEYE_CHECK(indexer_dim_ok(k8.size(1)), "keye.", op, ": D_I (k8.size(1)) must be one of (32, 64, 128), got ",
             k8.size(1));
  check_indexer_cache(k_cache, k_scale_cache, k8, "k8", op);
  const int64_t N = k8.size(0);
  check_dense(k_scale, k8, "k8", {at::kFloat}, 1, op, "k_scale", "[N]");
  check_size(k_scale, 0, N, op, "k_scale", "the token count (k8.size(0))");
  check_dense(slot_mapping, k8, "k8", {at::kInt, at::kLong}, 1, op, "slot_mapping", "[N]");
  check_size(slot_mapping, 0, N, op, "slot_mapping", "the token count (k8.size(0))");
  const int64_t num_slots = k_cache.size(0) * 64;
  check_index_range(slot_mapping, -1, num_slots - 1, op, "slot_mapping");
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(k8.device());
  const int chunks = static_cast<int>(k8.size(1) / 16);
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((N * chunks + threads - 1) / threads);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* src = reinterpret_cast<const uint4*>(k8.data_ptr());
  auto* dst = reinterpret_cast<uint4*>(k_cache.data_ptr());
  if (slot_mapping.scalar_type() == at::kInt) {
    cache_append_kernel<<<blocks, threads, 0, stream>>>(src, k_scale.data_ptr<float>(), slot_mapping.data_ptr<int>(),
                                                         N, chunks, num_slots, dst, k_scale_cache.data_ptr<float>());
  } else {
    cache_append_kernel<<<blocks, threads, 0, stream>>>(src, k_scale.data_ptr<float>(),
                                                         slot_mapping.data_ptr<int64_t>(), N, chunks, num_slots, dst,
                                                         k_scale_cache.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace keye
