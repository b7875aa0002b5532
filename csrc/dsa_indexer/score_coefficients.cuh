// The factor of an indexer score per (query row, head), w * D_I^-0.5 * q_scale, formed where a score kernel stages
// it, in the order and precision of the PyTorch path it replaces ((w * q_scale) * D_I^-0.5 in fp32). The ops used
// to take it precomputed: two or three elementwise kernels per decode call, and in a CUDA graph each adds its
// launch gap (NOTES.md, decode profile).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace keye {

enum class WeightType : int { kFloat32, kBFloat16, kFloat16 };

struct ScoreCoefficients {
  const void* w;         // [rows, H] in `type`
  const float* q_scale;  // [rows, H]
  WeightType type;
  float inv_sqrt_d;      // D_I^-0.5 rounded to fp32

  __device__ __forceinline__ float operator[](int64_t i) const {
    float wi;
    switch (type) {
      case WeightType::kBFloat16: wi = __bfloat162float(static_cast<const __nv_bfloat16*>(w)[i]); break;
      case WeightType::kFloat16: wi = __half2float(static_cast<const __half*>(w)[i]); break;
      default: wi = static_cast<const float*>(w)[i];
    }
    return wi * q_scale[i] * inv_sqrt_d;
  }
};

}  // namespace keye
