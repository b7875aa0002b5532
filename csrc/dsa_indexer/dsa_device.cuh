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

// The 64 fp32 accumulator operands of an m64n128 wgmma (d[0..63], constraint "+f" or "=f").
#define KEYE_ACC64(c)                                                                                                 \
  c(d[0]), c(d[1]), c(d[2]), c(d[3]), c(d[4]), c(d[5]), c(d[6]), c(d[7]), c(d[8]), c(d[9]), c(d[10]), c(d[11]),     \
      c(d[12]), c(d[13]), c(d[14]), c(d[15]), c(d[16]), c(d[17]), c(d[18]), c(d[19]), c(d[20]), c(d[21]), c(d[22]),  \
      c(d[23]), c(d[24]), c(d[25]), c(d[26]), c(d[27]), c(d[28]), c(d[29]), c(d[30]), c(d[31]), c(d[32]), c(d[33]),  \
      c(d[34]), c(d[35]), c(d[36]), c(d[37]), c(d[38]), c(d[39]), c(d[40]), c(d[41]), c(d[42]), c(d[43]), c(d[44]),  \
      c(d[45]), c(d[46]), c(d[47]), c(d[48]), c(d[49]), c(d[50]), c(d[51]), c(d[52]), c(d[53]), c(d[54]), c(d[55]),  \
      c(d[56]), c(d[57]), c(d[58]), c(d[59]), c(d[60]), c(d[61]), c(d[62]), c(d[63])
#define KEYE_ACC_RW(x) "+f"(x)
#define KEYE_ACC_W(x) "=f"(x)
#define KEYE_ACC64_REGS "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d[64] (+)= A (64 x 32 e4m3, K-major smem descriptor) * B (128 x 32 e4m3, K-major smem descriptor): both operands
// from shared memory, so no thread touches the A tile.
template <bool kAccumulate>
__device__ __forceinline__ void wgmma_m64n128k32_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (kAccumulate)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " KEYE_ACC64_REGS
                 ", %64, %65, p, 1, 1;\n}\n"
                 : KEYE_ACC64(KEYE_ACC_RW)
                 : "l"(desc_a), "l"(desc_b));
  else
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " KEYE_ACC64_REGS
                 ", %64, %65, p, 1, 1;\n}\n"
                 : KEYE_ACC64(KEYE_ACC_W)
                 : "l"(desc_a), "l"(desc_b));
}
#undef KEYE_ACC64
#undef KEYE_ACC_RW
#undef KEYE_ACC_W
#undef KEYE_ACC64_REGS

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
// permuted as rs_logical_group says (kRsOrder, for keys in registers) or in its own order (keys from shared memory
// too); 16-byte global loads by threads tid = 0 .. kThreads - 1.
template <int D, int N, int kThreads, bool kRsOrder = true>
__device__ __forceinline__ void stage_query_block(const uint8_t* q, int valid_cols, uint8_t* q_s, int tid) {
  constexpr int C = D / 16;  // 16-byte chunks of a row
  for (int i = tid; i < N * C; i += kThreads) {
    const int col = i / C, chunk = i % C;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (col < valid_cols) v = *reinterpret_cast<const uint4*>(q + static_cast<int64_t>(col) * D + 16 * chunk);
    if constexpr (!kRsOrder) {
      *reinterpret_cast<uint4*>(q_s + swz<D>(col, chunk)) = v;
      continue;
    }
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int lg = rs_logical_group<D>(4 * chunk + j);
      *reinterpret_cast<uint32_t*>(q_s + swz<D>(col, lg / 4) + 4 * (lg % 4)) = words[j];
    }
  }
}

}  // namespace keye
