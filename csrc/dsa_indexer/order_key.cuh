// Scores as order-preserving 32-bit keys, the form every top-k path selects on (and the decode score kernel's
// candidate lists store): NaN -> -inf, -0.0 -> +0.0, as the reference sorts them; key 0 lies below every score.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace keye {

__device__ __forceinline__ uint32_t order_key(float x) {
  if (x != x) x = -INFINITY;
  if (x == 0.f) x = 0.f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

}  // namespace keye
