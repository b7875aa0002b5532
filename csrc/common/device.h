// Host-side device facts shared by keye's launchers.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace keye {

// Streaming multiprocessors of a CUDA device, read once per device (launchers size their grids by it).
inline int sm_count(int device) {
  static int cached[64] = {0};
  int& c = cached[device & 63];
  if (c == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device));
  return c;
}

// Shared memory one CTA may opt in to on a CUDA device, read once per device (checked on every launch that needs it).
inline int max_smem_optin(int device) {
  static int cached[64] = {0};
  int& c = cached[device & 63];
  if (c == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&c, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return c;
}

}  // namespace keye
