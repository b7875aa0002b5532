// Programmatic dependent launch (sm_90): a kernel launched by launch_dependent() may start while the kernel before
// it in the stream is still finishing, so its launch and prologue overlap that kernel's tail instead of following
// it. Such a kernel must call grid_dependency_wait() before it reads anything an earlier kernel wrote (the wait
// returns once the previous grid has completed and its writes are visible; kernels launched without the attribute
// return from it at once). allow_dependent_launch() lets the next kernel's CTAs be scheduled now, into whatever
// room this grid leaves; without it they start only as this grid exits.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <utility>

namespace keye {

__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;\n" ::); }

template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace keye
