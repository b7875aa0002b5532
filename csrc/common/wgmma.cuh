// Hopper wgmma helpers shared by keye's kernel families: shared-memory matrix descriptors, the fence / commit /
// wait protocol, and the bf16 products the sparse-attention forward uses (the FP8 ones live with the indexer in
// dsa_indexer/dsa_device.cuh).
#pragma once

#include <cstdint>

namespace keye {

// Shared-memory matrix descriptor of a K-major tile whose rows are `row_bytes` (32, 64 or 128) long and
// swizzled with the matching 32/64/128-byte pattern (16-byte chunk c of row r stored at chunk
// c ^ ((r / (128 / row_bytes)) % (row_bytes / 16))); 8-row groups are 8 * row_bytes apart. The tile must start
// on a multiple of 8 * row_bytes; stepping K by 32 bytes adds 2 to the descriptor.
template <int kRowBytes>
__device__ __forceinline__ uint64_t smem_desc(const void* tile) {
  constexpr uint64_t kMode = kRowBytes == 128 ? 1 : (kRowBytes == 64 ? 2 : 3);
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
  return static_cast<uint64_t>((a & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (static_cast<uint64_t>((8 * kRowBytes) >> 4) << 32) | (kMode << 62);
}

// Descriptor of an MN-major operand in the 128-byte swizzle: k-rows of 128 bytes (64 bf16 of N), 16-byte chunk c
// of k-row r stored at chunk c ^ (r % 8), groups of 8 k-rows `group_bytes` apart, and N beyond 64 in further such
// column blocks `column_block_bytes` apart. The start must be a multiple of 1024 bytes.
__device__ __forceinline__ uint64_t smem_desc_mn128(const void* tile, uint32_t column_block_bytes, uint32_t group_bytes) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
  return static_cast<uint64_t>((a & 0x3FFFF) >> 4) | (static_cast<uint64_t>(column_block_bytes >> 4) << 16) |
         (static_cast<uint64_t>(group_bytes >> 4) << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N committed wgmma groups of this warpgroup are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

// Keeps the compiler from moving accumulator registers across wgmma issue/wait points (the hardware writes
// them asynchronously in between).
template <int R>
__device__ __forceinline__ void fence_operands(float (&r)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int R, int C>
__device__ __forceinline__ void fence_operands(float (&r)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) asm volatile("" : "+f"(r[i][j])::"memory");
}

// d[32] (+)= A (64 x 16 bf16 from registers) * B (64 x 16 bf16, K-major smem descriptor); accumulate = 0 overwrites
// d. Per warp w of the warpgroup, A is rows 16w .. 16w + 15 in the mma.sync m16n8k16 A-fragment layout, and d is
// its 16 rows in the m16n8 accumulator layout, one n8 block per 4 registers (keys 8b .. 8b + 7 in d[4b .. 4b + 3]).
__device__ __forceinline__ void wgmma_m64n64k16_bf16_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                                        int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

// d (+)= A (64 x 16 bf16 from registers, as in wgmma_m64n64k16_bf16_rs) * B (16 x 128 bf16, MN-major smem
// descriptor: the transposed operand, rows of B = the 16 k-rows with N contiguous); always accumulates. d[b][0..3]
// is n8 block b of the warp's 16 rows in the m16n8 accumulator layout.
__device__ __forceinline__ void wgmma_m64n128k16_bf16_rs_mn(float (&d)[16][4], const uint32_t (&a)[4],
                                                            uint64_t desc_b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}

}  // namespace keye
