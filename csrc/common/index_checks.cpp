#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/check.h"

namespace keye {

static std::atomic<bool>& index_checks_flag() {
  // Default on; KEYE_INDEX_CHECKS=0 turns them off for the whole process.
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("KEYE_INDEX_CHECKS");
    return !(env && std::strcmp(env, "0") == 0);
  }()};
  return flag;
}

bool index_checks_enabled() { return index_checks_flag().load(std::memory_order_relaxed); }

void set_index_checks_enabled(bool enabled) { index_checks_flag().store(enabled, std::memory_order_relaxed); }

void check_index_range(const at::Tensor& t, int64_t lo, int64_t hi, const char* op, const char* name) {
  if (!index_checks_enabled() || t.numel() == 0) return;
  if (t.is_cuda()) {  // a sync is illegal while a CUDA graph is being captured
    cudaStreamCaptureStatus status;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(t.device().index()), &status));
    if (status != cudaStreamCaptureStatusNone) return;
  }
  auto [mn, mx] = at::aminmax(t);
  const int64_t vmin = mn.item<int64_t>();
  const int64_t vmax = mx.item<int64_t>();
  KEYE_CHECK(vmin >= lo && vmax <= hi, "keye.", op, ": argument '", name, "' must hold values in [", lo, ", ",
              hi, "], found values in [", vmin, ", ", vmax,
              "] (index checks can be disabled with keye.ops.index_checks(False) once inputs are trusted)");
}

}  // namespace keye
