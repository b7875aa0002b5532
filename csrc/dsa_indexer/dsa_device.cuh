// Device helpers for the DSA indexer kernels: Hopper FP8 wgmma (descriptors and the fence / commit / wait protocol
// are in common/wgmma.cuh, cp.async and mma.sync in common/ptx.cuh).
//
// FP8 tensor-core math on sm_90 has to go through wgmma: mma.sync m16n8k32 e4m3 is an sm_89 instruction that
// sm_90 emulates via FP16 (NVIDIA/cutlass#1986); the first keye score kernel used it and reached 127 TFLOP/s.
#pragma once

#include <cstdint>

#include "common/bulk_copy.cuh"
#include "common/ptx.cuh"
#include "common/wgmma.cuh"

namespace keye {

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][D] K-major tile with the swizzle smem_desc<D>
// describes.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  constexpr int C = D / 16;
  constexpr int RS = (C == 8) ? 0 : (C == 4 ? 1 : 2);
  return row * D + ((chunk ^ ((row >> RS) & (C - 1))) << 4);
}

// d[8] (+)= A (64 x 32 e4m3 from registers) * B (16 x 32 e4m3, K-major smem descriptor). Thread (warp w, lane
// 4g + t) supplies rows 16w + g (a[0], a[2]) and 16w + g + 8 (a[1], a[3]), columns 4t..4t+3 (a[0], a[1]) and
// 16 + 4t..16 + 4t + 3 (a[2], a[3]) of A, one byte per column, lowest column in the lowest byte.
__device__ __forceinline__ void wgmma_m64n16k32_rs(float (&d)[8], const uint32_t (&a)[4], uint64_t desc_b,
                                                   int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, "
      "%12, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

// d[64] (+)= A (64 x 32 e4m3 from registers, fragment as in wgmma_m64n16k32_rs) * B (128 x 32 e4m3, K-major smem
// descriptor). kAccumulate = false overwrites d without reading it, so the registers carry no dependency on their
// old values.
template <bool kAccumulate>
__device__ __forceinline__ void wgmma_m64n128k32_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (kAccumulate)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
  else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]), "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]), "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]), "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]), "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]), "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}

// Keys as the register (A) operand, read from plain row-major [keys][D] shared memory (a bulk copy lands them
// there unswizzled). The A fragment of lane 4g + t holds, per 32-byte k-step ks, the 4-byte groups t and 4 + t of
// rows g and g + 8. A dot product does not depend on the order of D, so lane t instead takes the *contiguous* D / 4
// bytes [t * D / 4, (t + 1) * D / 4) of its rows (16-byte loads; a warp reads 8 whole consecutive rows, no bank
// conflicts) and presents them as its fragment's groups; the queries (B, in swizzled shared memory) are permuted
// the same way, so every product still pairs a q byte with the k byte of the same original index.
// Physical group pg of a row <-> logical group 8 * ks + 4 * h + t with pg = t * (D / 16) + 2 * ks + h.
template <int D>
__device__ __forceinline__ int rs_logical_group(int pg) {
  const int t = pg / (D / 16), rem = pg % (D / 16);
  return 8 * (rem >> 1) + 4 * (rem & 1) + t;
}

// This thread's D / 4 bytes of one key row (D / 16 words), zero when the row is not visible.
template <int D>
struct KeySlice {
  uint32_t w[D / 16];
};

template <int D>
__device__ __forceinline__ void load_key_slice(KeySlice<D>& ks, const uint8_t* row, int t, bool valid) {
  const uint8_t* src = row + t * (D / 4);
  if constexpr (D == 32) {
    const uint2 v = *reinterpret_cast<const uint2*>(src);
    ks.w[0] = valid ? v.x : 0u, ks.w[1] = valid ? v.y : 0u;
  } else {
#pragma unroll
    for (int k = 0; k < D / 16; k += 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(src + 4 * k);
      ks.w[k] = valid ? v.x : 0u, ks.w[k + 1] = valid ? v.y : 0u;
      ks.w[k + 2] = valid ? v.z : 0u, ks.w[k + 3] = valid ? v.w : 0u;
    }
  }
}

// A fragment of k-step ks from the slices of rows g (lo) and g + 8 (hi).
template <int D>
__device__ __forceinline__ void rs_fragment(uint32_t (&a)[4], const KeySlice<D>& lo, const KeySlice<D>& hi, int ks) {
  a[0] = lo.w[2 * ks], a[1] = hi.w[2 * ks], a[2] = lo.w[2 * ks + 1], a[3] = hi.w[2 * ks + 1];
}

// Query block [N columns][D] (column c = row c of q, zero past valid_cols) into swizzled shared memory, each row
// permuted as rs_logical_group says; 16-byte global loads by threads tid = 0 .. kThreads - 1.
template <int D, int N, int kThreads>
__device__ __forceinline__ void stage_rs_queries(const uint8_t* q, int valid_cols, uint8_t* q_s, int tid) {
  constexpr int C = D / 16;  // 16-byte chunks of a row
  for (int i = tid; i < N * C; i += kThreads) {
    const int col = i / C, chunk = i % C;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (col < valid_cols) v = *reinterpret_cast<const uint4*>(q + static_cast<int64_t>(col) * D + 16 * chunk);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int lg = rs_logical_group<D>(4 * chunk + j);
      *reinterpret_cast<uint32_t*>(q_s + swz<D>(col, lg / 4) + 4 * (lg % 4)) = words[j];
    }
  }
}

}  // namespace keye
