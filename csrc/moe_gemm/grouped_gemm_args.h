// What the host side of the grouped GEMMs hands one compiled CUTLASS configuration (kept free of CUTLASS types so
// the dispatcher does not compile CUTLASS's headers).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>

namespace keye {

enum class GroupedKind : int {
  kFwd = 0,    // out[r] = a[r] @ b[e], b [E, K, N] (N contiguous)
  kDgrad = 1,  // out[r] = a[r] @ b[e]^T, b [E, N, K] (K contiguous)
  kWgrad = 2,  // out[e] = a[rows e]^T @ dy[rows e], a [R, M], dy [R, N], out [E, M, N]
  kFwdSwiglu = 3,  // out[r] = swiglu(a[r] @ b[e]), b [E, K, 2I] in moe_pack_gate_up's order, out [R, I]
};

struct GroupedGemmArgs {
  GroupedKind kind;
  const void* a;        // bf16
  const void* b;        // bf16 (weights for kFwd/kDgrad, dy for kWgrad)
  void* out;            // bf16
  const int* offsets;   // [E + 1], device
  int num_experts;
  int64_t rows;         // R: rows of a (kFwd/kDgrad) or of a and dy (kWgrad); offsets are clamped to [0, R]
  int m, n, k;          // kFwd/kDgrad/kFwdSwiglu: N and K of the per-expert GEMM (m unused; kFwdSwiglu writes N / 2
                        // columns); kWgrad: M = a's columns, N, k unused
  at::TensorOptions byte_options;  // where the pointer/stride arrays and CUTLASS's workspace are allocated
  cudaStream_t stream;
};

// The checks of an expert-offsets argument ([E + 1] int32, non-decreasing, within [0, rows]) shared by every op
// here; experts < 0 leaves E free. ref / ref_name: the tensor offsets must share a device with.
void check_group_offsets(const at::Tensor& offsets, const at::Tensor& ref, const char* ref_name, int64_t rows,
                         int64_t experts, const char* op);

#ifdef __CUDACC__
// Rows [begin, end) of expert e, clamped to [0, rows]: offsets that break the contract (reported by the host checks
// when index checks are on) give wrong rows but never an access outside the tensors.
struct ExpertRows {
  int64_t begin, end;
};
__device__ __forceinline__ ExpertRows expert_rows(const int* offsets, int e, int64_t rows) {
  const int64_t begin = min(max(static_cast<int64_t>(offsets[e]), int64_t{0}), rows);
  return {begin, min(max(static_cast<int64_t>(offsets[e + 1]), begin), rows)};
}
#endif

// One compiled CUTLASS configuration: run() launches it, name() says what it is ("cooperative 128x256x64
// cluster 2x1"). Defined in grouped_gemm_kernel.cuh, instantiated one per translation unit
// (grouped_gemm_<kind>_<config>.cu) so they compile in parallel.
template <GroupedKind kKind, int kConfig>
struct GroupedGemmConfig {
  static void run(const GroupedGemmArgs& args);
  static const char* name();
};

// How many configurations each kind has compiled in (config ids 0..n-1; see grouped_gemm_kernel.cuh).
constexpr int kNumConfigs[4] = {6, 3, 2, 2};

}  // namespace keye
