// Host side of the MoE grouped GEMMs: argument checks, the choice of tile configuration, and the zero fill of
// output that no expert covers. The GEMMs themselves are CUTLASS kernels (grouped_gemm_kernel.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <climits>
#include <string>
#include <vector>

#include "common/check.h"
#include "moe_gemm/grouped_gemm.h"
#include "moe_gemm/grouped_gemm_args.h"
#include "moe_gemm/packed_gate_up.cuh"

namespace keye {
namespace {

using RunFn = void (*)(const GroupedGemmArgs&);
using NameFn = const char* (*)();
struct ConfigEntry {
  RunFn run;
  NameFn name;
};

template <GroupedKind kKind, int... kIds>
std::vector<ConfigEntry> table(std::integer_sequence<int, kIds...>) {
  return {ConfigEntry{&GroupedGemmConfig<kKind, kIds>::run, &GroupedGemmConfig<kKind, kIds>::name}...};
}

const std::vector<ConfigEntry>& configs(GroupedKind kind) {
  static const std::vector<ConfigEntry> fwd = table<GroupedKind::kFwd>(std::make_integer_sequence<int, kNumConfigs[0]>{});
  static const std::vector<ConfigEntry> dgrad =
      table<GroupedKind::kDgrad>(std::make_integer_sequence<int, kNumConfigs[1]>{});
  static const std::vector<ConfigEntry> wgrad =
      table<GroupedKind::kWgrad>(std::make_integer_sequence<int, kNumConfigs[2]>{});
  static const std::vector<ConfigEntry> fwd_swiglu =
      table<GroupedKind::kFwdSwiglu>(std::make_integer_sequence<int, kNumConfigs[3]>{});
  switch (kind) {
    case GroupedKind::kFwd: return fwd;
    case GroupedKind::kDgrad: return dgrad;
    case GroupedKind::kWgrad: return wgrad;
    case GroupedKind::kFwdSwiglu: return fwd_swiglu;
  }
  return fwd;
}

// Default tile configuration from the average rows per expert (known on the host without a sync) and the
// reduction length K. From the H200 sweeps (NOTES.md, MoE grouped GEMM; Keye shapes at 4K/16K/64K tokens, all
// configurations timed round-robin in one run):
// - fwd: cooperative 128x256 with a 1x2 cluster (A tile multicast to both N halves) is fastest up to ~1024 rows
//   per expert; pingpong 128x128 (one warpgroup's epilogue overlapping the other's main loop) from 4096 rows
//   (-6% gate_up, -14% down at 64K tokens), and from 2048 rows when K is short (down, K = 768);
// - dgrad: pingpong 128x128 from 1024 rows per expert, cooperative 128x256 below;
// - wgrad: cooperative 128x256 at every size measured;
// - below ~96 rows per expert the 64-row pingpong tile wastes least on partial tiles;
// - fwd_swiglu (thirtieth session, Keye gate_up): cooperative 128x256 1x2 at 4K and 16K tokens, pingpong 64x256 2x1
//   at 64K (4096 rows per expert).
int default_config(GroupedKind kind, int64_t avg_rows, int64_t k) {
  switch (kind) {
    case GroupedKind::kFwd:
      if (avg_rows < 96) return 0;
      return (avg_rows >= 4096 || (k <= 1024 && avg_rows >= 2048)) ? 1 : 5;
    case GroupedKind::kDgrad: return avg_rows < 96 ? 0 : avg_rows >= 1024 ? 1 : 2;
    case GroupedKind::kWgrad: return 1;
    case GroupedKind::kFwdSwiglu: return avg_rows >= 4096 ? 1 : 0;
  }
  return 0;
}

// Rows [*end, rows) of a bf16 [rows, cols] tensor (cols % 8 == 0) set to zero: the rows of slots no expert owns.
__global__ void zero_tail_rows_kernel(__nv_bfloat16* out, const int* __restrict__ end, int64_t rows, int64_t cols) {
  const int64_t first = min(max(static_cast<int64_t>(*end), int64_t{0}), rows);
  const int64_t n = (rows - first) * cols / 8;  // cols % 8 == 0: 16-byte stores
  uint4* p = reinterpret_cast<uint4*>(out + first * cols);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = make_uint4(0, 0, 0, 0);
}

// Weight gradients of experts that received no rows are zero (the GEMM schedules no tile for them).
__global__ void zero_empty_experts_kernel(__nv_bfloat16* out, const int* __restrict__ offsets, int64_t per_expert) {
  const int e = blockIdx.y;
  if (offsets[e + 1] > offsets[e]) return;
  uint4* p = reinterpret_cast<uint4*>(out + e * per_expert);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < per_expert / 8;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = make_uint4(0, 0, 0, 0);
}

void check_bf16_matrix(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  check_cuda(t, op, name);
  check_dtype(t, {at::kBFloat16}, op, name);
  check_dim(t, dim, op, name, layout);
  check_contiguous(t, op, name);
  KEYE_CHECK(t.size(-1) % 8 == 0, "keye.", op, ": argument '", name, "' must have a last dim that is a multiple of 8 ",
             "(16-byte rows for TMA), got shape ", dims_str(t.sizes()));
}

int pick_config(GroupedKind kind, int64_t config, int64_t rows, int64_t experts, int64_t k, const char* op) {
  const int n = static_cast<int>(configs(kind).size());
  KEYE_CHECK(config >= -1 && config < n, "keye.", op, ": argument 'config' must be -1 (automatic) or in [0, ", n,
             "), got ", config);
  return config >= 0 ? static_cast<int>(config) : default_config(kind, rows / experts, k);
}

GroupedGemmArgs make_args(GroupedKind kind, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
                          const at::Tensor& offsets, int64_t rows) {
  GroupedGemmArgs args{};
  args.kind = kind;
  args.a = a.data_ptr();
  args.b = b.data_ptr();
  args.out = out.data_ptr();
  args.offsets = offsets.data_ptr<int>();
  args.num_experts = static_cast<int>(offsets.size(0) - 1);
  args.rows = rows;
  args.byte_options = a.options().dtype(at::kByte);
  args.stream = c10::cuda::getCurrentCUDAStream();
  return args;
}

}  // namespace

void check_group_offsets(const at::Tensor& offsets, const at::Tensor& ref, const char* ref_name, int64_t rows,
                         int64_t experts, const char* op) {
  check_cuda(offsets, op, "offsets");
  check_same_device(offsets, ref, op, "offsets", ref_name);
  check_dtype(offsets, {at::kInt}, op, "offsets");
  check_dim(offsets, 1, op, "offsets", "[E + 1]");
  check_contiguous(offsets, op, "offsets");
  KEYE_CHECK(offsets.size(0) >= 2, "keye.", op, ": argument 'offsets' must hold E + 1 >= 2 values, got ",
             offsets.size(0));
  if (experts >= 0) check_size(offsets, 0, experts + 1, op, "offsets", "E + 1 (the weights' experts + 1)");
  check_index_range(offsets, 0, rows, op, "offsets");
  // Only with checks on: the differences are a tensor op (a kernel and an allocation per GEMM call otherwise).
  if (index_checks_enabled())
    check_index_range(offsets.slice(0, 1) - offsets.slice(0, 0, -1), 0, rows, op, "offsets (differences)");
}

std::vector<std::string> moe_grouped_gemm_configs(const std::string& kind) {
  KEYE_CHECK(kind == "fwd" || kind == "dgrad" || kind == "wgrad" || kind == "fwd_swiglu",
             "keye.moe_grouped_gemm_configs: kind must be 'fwd', 'dgrad', 'wgrad' or 'fwd_swiglu', got '", kind, "'");
  const auto& list = configs(kind == "fwd"     ? GroupedKind::kFwd
                             : kind == "dgrad" ? GroupedKind::kDgrad
                             : kind == "wgrad" ? GroupedKind::kWgrad
                                               : GroupedKind::kFwdSwiglu);
  std::vector<std::string> names;
  for (const auto& c : list) names.emplace_back(c.name());
  return names;
}

namespace {

// The row-grouped GEMMs' operands: a [R, K] and per-expert b (bf16, contiguous, on a's device) whose dim k_dim is K;
// returns b's other matrix dim, the product's N.
int64_t check_row_grouped_operands(const at::Tensor& a, const at::Tensor& b, int k_dim, const char* b_layout,
                                   const char* op) {
  check_bf16_matrix(a, 2, op, "a", "[R, K]");
  check_bf16_matrix(b, 3, op, "b", b_layout);
  check_same_device(b, a, op, "b", "a");
  check_size(b, k_dim, a.size(1), op, "b", "K (a.size(1))");
  return b.size(3 - k_dim);
}

// The row-grouped GEMMs after their operand checks: out [R, out_cols] = the kind's product per expert (N columns of
// products per row), rows at or past offsets[E] zero.
at::Tensor run_row_grouped(GroupedKind kind, const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                           int64_t N, int64_t out_cols, int64_t config, const char* op) {
  const int64_t R = a.size(0), K = a.size(1), E = b.size(0);
  KEYE_CHECK(R < INT_MAX, "keye.", op, ": at most 2^31 - 1 rows, got ", R);
  check_group_offsets(offsets, a, "a", R, E, op);
  at::Tensor out = at::empty({R, out_cols}, a.options());
  if (R == 0 || N == 0) return out;
  if (K == 0) return out.zero_();  // an empty sum (and silu(0) * 0 for kFwdSwiglu)
  const c10::cuda::CUDAGuard guard(a.device());
  GroupedGemmArgs args = make_args(kind, a, b, out, offsets, R);
  args.n = static_cast<int>(N);
  args.k = static_cast<int>(K);
  configs(kind)[pick_config(kind, config, R, E, K, op)].run(args);
  zero_tail_rows_kernel<<<64, 256, 0, args.stream>>>(reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                                                     offsets.data_ptr<int>() + E, R, out_cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

at::Tensor moe_grouped_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, bool trans_b,
                               int64_t config) {
  const char* op = "moe_grouped_mm";
  const int64_t N = check_row_grouped_operands(a, b, trans_b ? 2 : 1, trans_b ? "[E, N, K]" : "[E, K, N]", op);
  KEYE_CHECK(N % 8 == 0, "keye.", op, ": the output width N must be a multiple of 8, got ", N);
  return run_row_grouped(trans_b ? GroupedKind::kDgrad : GroupedKind::kFwd, a, b, offsets, N, N, config, op);
}

at::Tensor moe_grouped_mm_swiglu_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                      int64_t config) {
  const char* op = "moe_grouped_mm_swiglu";
  const int64_t N = check_row_grouped_operands(a, b, 1, "[E, K, 2I] (moe_pack_gate_up's column order)", op);
  KEYE_CHECK(N % kPackedGateUpTile == 0, "keye.", op, ": argument 'b' must have 2I a multiple of ", kPackedGateUpTile,
             " columns (I a multiple of ", kPackedGateUpTile / 2, ": moe_pack_gate_up's tiles), got shape ",
             dims_str(b.sizes()));
  return run_row_grouped(GroupedKind::kFwdSwiglu, a, b, offsets, N, N / 2, config, op);
}

at::Tensor moe_grouped_mm_wgrad_cuda(const at::Tensor& a, const at::Tensor& dy, const at::Tensor& offsets,
                                     int64_t config) {
  const char* op = "moe_grouped_mm_wgrad";
  check_bf16_matrix(a, 2, op, "a", "[R, M]");
  check_bf16_matrix(dy, 2, op, "dy", "[R, N]");
  check_same_device(dy, a, op, "dy", "a");
  check_size(dy, 0, a.size(0), op, "dy", "the rows of a");
  const int64_t R = a.size(0), M = a.size(1), N = dy.size(1);
  KEYE_CHECK(R < INT_MAX, "keye.", op, ": at most 2^31 - 1 rows, got ", R);
  check_group_offsets(offsets, a, "a", R, -1, op);
  const int64_t E = offsets.size(0) - 1;
  at::Tensor out = at::empty({E, M, N}, a.options());
  if (M == 0 || N == 0) return out;
  const c10::cuda::CUDAGuard guard(a.device());
  GroupedGemmArgs args = make_args(GroupedKind::kWgrad, a, dy, out, offsets, R);
  args.m = static_cast<int>(M);
  args.n = static_cast<int>(N);
  if (R > 0) configs(GroupedKind::kWgrad)[pick_config(GroupedKind::kWgrad, config, R, E, R, op)].run(args);
  const int64_t per_expert = M * N;
  zero_empty_experts_kernel<<<dim3(static_cast<unsigned>(std::min<int64_t>(64, (per_expert / 8 + 255) / 256)),
                                   static_cast<unsigned>(E)),
                              256, 0, args.stream>>>(reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                                                     offsets.data_ptr<int>(), per_expert);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace keye
