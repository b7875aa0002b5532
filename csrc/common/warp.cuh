// Warp-level helpers shared by keye's kernel families.
#pragma once

namespace keye {

// Inclusive prefix sum of x over the 32 lanes of a full warp (lane order); every lane must call it.
__device__ __forceinline__ int warp_inclusive_sum(int x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

}  // namespace keye
