// Bulk copies from global to shared memory (TMA without a tensor map, and 2-D tensor copies through one), their
// mbarriers, and L2 cache policies (the DSA indexer's score kernels and the fused MoE decode kernel).
#pragma once

#include <cstdint>

namespace keye {

// Orders this thread's generic-proxy shared-memory accesses (cp.async included) before later async-proxy ones:
// writes become visible to wgmma, and reads are performed before a bulk copy (issued after a barrier) overwrites
// the same bytes. Without it a read of a ring stage can still be in flight when the stage's refill lands: the
// score kernel beside a shared-memory-heavy kernel on another stream read a later tile's key scale (NOTES.md).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// mbarrier + bulk copy (TMA without a tensor map): one thread moves a contiguous block global -> shared and the
// barrier's transaction count tracks its arrival.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))),
               "r"(count));
}
// Makes initialised barriers visible to the async proxy (the bulk copies' completion).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(a), "r"(parity) : "memory");
}
// An L2 policy that evicts these lines first: streamed data that should not push out what is read next.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// An L2 policy that keeps these lines longer: data many CTAs read again.
__device__ __forceinline__ uint64_t l2_evict_last_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// bytes (a multiple of 16; both addresses 16-byte aligned) from src to dst; completes on bar.
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                              uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n"
      ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))), "l"(src), "r"(bytes),
      "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "l"(policy)
      : "memory");
}

// The box at coordinates (x, y) of a 2-D tensor map (common/tensor_map.h; x is the contiguous coordinate) from
// global to shared memory, in the map's swizzle; rows outside the tensor land as zeros and still count toward the
// barrier's transaction bytes (a box entirely outside is a way to zero-fill a stage). map: the generic address of
// a __grid_constant__ CUtensorMap kernel parameter.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* map, int x, int y, uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3}], [%4], %5;\n"
      ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))), "l"(map), "r"(x), "r"(y),
      "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "l"(policy)
      : "memory");
}

// A plain arrival (no transaction bytes): consumers tell the producer that a ring stage is free again.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar)))
               : "memory");
}

}  // namespace keye
