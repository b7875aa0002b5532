// The CUTLASS 3.x Hopper grouped GEMM behind keye's MoE GEMMs: TMA loads, warp-specialised persistent kernels
// (ptr-array schedules, grid = SM count), per-expert problem shapes, pointers and strides built on the device from
// the expert offsets by prepare_groups (so no group size ever reaches the host and the launch is graph-capturable).
//
// Included only by the grouped_gemm_<kind>_<config>.cu files: each instantiates one configuration, because each
// takes about a minute to compile and they compile in parallel.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <string>

#include "common/check.h"
#include "common/device.h"
#include "moe_gemm/grouped_gemm_args.h"
#include "moe_gemm/swiglu_epilogue.cuh"

namespace keye::grouped {

using namespace cute;

struct Pingpong {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
  static constexpr const char* kName = "pingpong";
};
struct Cooperative {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  static constexpr const char* kName = "cooperative";
};

template <class Schedule_, int kM, int kN, int kK, int kClusterM, int kClusterN = 1>
struct Tiling {
  using Schedule = Schedule_;
  using Tile = Shape<Int<kM>, Int<kN>, Int<kK>>;
  using Cluster = Shape<Int<kClusterM>, Int<kClusterN>, _1>;
  static std::string name() {
    return std::string(Schedule::kName) + " " + std::to_string(kM) + "x" + std::to_string(kN) + "x" +
           std::to_string(kK) + " cluster " + std::to_string(kClusterM) + "x" + std::to_string(kClusterN);
  }
};

// The configuration table: kind x config id -> tiling (ids are what grouped_gemm_configs() lists).
// Small tiles serve the few rows per expert of small batches; wide ones the long expert segments of prefill.
template <GroupedKind kKind, int kConfig> struct TilingFor;
template <> struct TilingFor<GroupedKind::kFwd, 0> { using type = Tiling<Pingpong, 64, 128, 64, 1>; };
template <> struct TilingFor<GroupedKind::kFwd, 1> { using type = Tiling<Pingpong, 128, 128, 64, 2>; };
template <> struct TilingFor<GroupedKind::kFwd, 2> { using type = Tiling<Cooperative, 128, 128, 64, 2>; };
template <> struct TilingFor<GroupedKind::kFwd, 3> { using type = Tiling<Cooperative, 128, 256, 64, 2>; };
template <> struct TilingFor<GroupedKind::kFwd, 4> { using type = Tiling<Cooperative, 256, 128, 64, 2>; };
template <> struct TilingFor<GroupedKind::kFwd, 5> { using type = Tiling<Cooperative, 128, 256, 64, 1, 2>; };
template <> struct TilingFor<GroupedKind::kDgrad, 0> { using type = Tiling<Pingpong, 64, 128, 64, 1>; };
template <> struct TilingFor<GroupedKind::kDgrad, 1> { using type = Tiling<Pingpong, 128, 128, 64, 2>; };
template <> struct TilingFor<GroupedKind::kDgrad, 2> { using type = Tiling<Cooperative, 128, 256, 64, 2>; };
template <> struct TilingFor<GroupedKind::kWgrad, 0> { using type = Tiling<Cooperative, 128, 128, 64, 1>; };
template <> struct TilingFor<GroupedKind::kWgrad, 1> { using type = Tiling<Cooperative, 128, 256, 64, 2>; };
// The SwiGLU epilogue needs 256 packed columns per tile (swiglu_epilogue.cuh). Config 0 is fwd's config 5 tiling;
// 1 is pingpong (one warpgroup's register epilogue runs under the other's products) with B shared by a 2 x 1
// cluster. Pingpong 64x256 with a 1 x 2 cluster was measured slower than both at 4K-64K tokens (NOTES.md).
template <> struct TilingFor<GroupedKind::kFwdSwiglu, 0> { using type = Tiling<Cooperative, 128, 256, 64, 1, 2>; };
template <> struct TilingFor<GroupedKind::kFwdSwiglu, 1> { using type = Tiling<Pingpong, 64, 256, 64, 2, 1>; };

// Operand layouts in CUTLASS's terms (A is M x K, B is N x K, D is M x N; RowMajor B = N contiguous):
//   kFwd   A = a [R, K] row-major, B = w[e] [K, N] (N contiguous), D = out [R, N]
//   kDgrad A = a [R, K] row-major, B = w[e] [N, K] (K contiguous), D = out [R, N]
//   kWgrad A = a^T (M contiguous: a is [R, M]), B = dy [R, N] (N contiguous), D = out[e] [M, N]
template <GroupedKind kKind> struct LayoutsFor;
template <> struct LayoutsFor<GroupedKind::kFwd> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::RowMajor;
};
template <> struct LayoutsFor<GroupedKind::kDgrad> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::ColumnMajor;
};
template <> struct LayoutsFor<GroupedKind::kFwdSwiglu> : LayoutsFor<GroupedKind::kFwd> {};
template <> struct LayoutsFor<GroupedKind::kWgrad> {
  using A = cutlass::layout::ColumnMajor;
  using B = cutlass::layout::RowMajor;
};

template <GroupedKind kKind, class T>
struct GemmFor {
  using Element = cutlass::bfloat16_t;
  using LayoutA = typename LayoutsFor<kKind>::A;
  using LayoutB = typename LayoutsFor<kKind>::B;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;  // 16 bytes: TMA's unit
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;

  using LinearEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename T::Tile, typename T::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlign,  // no source operand C
      Element, LayoutD*, kAlign, typename T::Schedule::Epilogue,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;
  using SwigluEpilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      SwigluEpilogueArray<cutlass::detail::TagToStrideC_t<LayoutD*>>>;
  using Epilogue = std::conditional_t<kKind == GroupedKind::kFwdSwiglu, SwigluEpilogue, LinearEpilogue>;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA*, kAlign, Element, LayoutB*, kAlign, float,
      typename T::Tile, typename T::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename T::Schedule::Kernel>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Problem = typename ProblemShape::UnderlyingProblemShape;
};

// The per-expert arrays CUTLASS's ptr-array kernels read, carved out of one byte tensor.
template <class G>
struct GroupArrays {
  typename G::Problem* problems;
  const typename G::Element** a;
  const typename G::Element** b;
  typename G::Element** d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;

  static int64_t bytes(int groups) {
    auto up = [](int64_t x) { return (x + 15) / 16 * 16; };
    return up(groups * sizeof(typename G::Problem)) + 3 * up(groups * sizeof(void*)) +
           up(groups * sizeof(typename G::StrideA)) + up(groups * sizeof(typename G::StrideB)) +
           up(groups * sizeof(typename G::StrideD));
  }
  GroupArrays(uint8_t* base, int groups) {
    auto take = [&](int64_t n) { uint8_t* p = base; base += (n + 15) / 16 * 16; return p; };
    problems = reinterpret_cast<typename G::Problem*>(take(groups * sizeof(typename G::Problem)));
    a = reinterpret_cast<const typename G::Element**>(take(groups * sizeof(void*)));
    b = reinterpret_cast<const typename G::Element**>(take(groups * sizeof(void*)));
    d = reinterpret_cast<typename G::Element**>(take(groups * sizeof(void*)));
    stride_a = reinterpret_cast<typename G::StrideA*>(take(groups * sizeof(typename G::StrideA)));
    stride_b = reinterpret_cast<typename G::StrideB*>(take(groups * sizeof(typename G::StrideB)));
    stride_d = reinterpret_cast<typename G::StrideD*>(take(groups * sizeof(typename G::StrideD)));
  }
};

// One thread per expert: its problem shape, operand pointers and (packed) strides. An expert without rows gets an
// empty problem (M = 0: no tiles are scheduled for it); kWgrad zero-fills those experts' outputs separately.
template <GroupedKind kKind, class G>
__global__ void prepare_groups(GroupArrays<G> arrays, const int* __restrict__ offsets, int num_experts,
                               int64_t total_rows, int m, int n, int k, const typename G::Element* a,
                               const typename G::Element* b, typename G::Element* out) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= num_experts) return;
  const ExpertRows range = expert_rows(offsets, e, total_rows);
  const int r0 = static_cast<int>(range.begin);
  const int rows = static_cast<int>(range.end - range.begin);
  if constexpr (kKind == GroupedKind::kWgrad) {
    // M = a's columns, N = dy's columns, K = the expert's rows.
    arrays.problems[e] = rows > 0 ? typename G::Problem(m, n, rows) : typename G::Problem(0, n, 1);
    arrays.a[e] = a + static_cast<int64_t>(r0) * m;
    arrays.b[e] = b + static_cast<int64_t>(r0) * n;
    arrays.d[e] = out + static_cast<int64_t>(e) * m * n;
    arrays.stride_a[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, make_shape(m, rows, 1));
    arrays.stride_b[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, make_shape(n, rows, 1));
    arrays.stride_d[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, make_shape(m, n, 1));
  } else {
    // M = the expert's rows; the weights are one packed [N, K] or [K, N] matrix per expert. kFwdSwiglu writes
    // N / 2 columns per row (one per gate / up pair).
    const int out_cols = kKind == GroupedKind::kFwdSwiglu ? n / 2 : n;
    arrays.problems[e] = typename G::Problem(rows, n, k);
    arrays.a[e] = a + static_cast<int64_t>(r0) * k;
    arrays.b[e] = b + static_cast<int64_t>(e) * n * k;
    arrays.d[e] = out + static_cast<int64_t>(r0) * out_cols;
    arrays.stride_a[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, make_shape(rows, k, 1));
    arrays.stride_b[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, make_shape(n, k, 1));
    arrays.stride_d[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, make_shape(rows, out_cols, 1));
  }
}

template <GroupedKind kKind, int kConfig>
void run(const GroupedGemmArgs& args) {
  using G = GemmFor<kKind, typename TilingFor<kKind, kConfig>::type>;
  using Element = typename G::Element;
  const int groups = args.num_experts;
  at::Tensor table = at::empty({GroupArrays<G>::bytes(groups)}, args.byte_options);
  GroupArrays<G> arrays(table.data_ptr<uint8_t>(), groups);
  prepare_groups<kKind, G><<<(groups + 127) / 128, 128, 0, args.stream>>>(
      arrays, args.offsets, groups, args.rows, args.m, args.n, args.k, static_cast<const Element*>(args.a),
      static_cast<const Element*>(args.b), static_cast<Element*>(args.out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count(device);

  typename G::Gemm::Arguments gemm_args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, arrays.problems, nullptr},  // shapes on the device only: persistent grid of sm_count CTAs
      {arrays.a, arrays.stride_a, arrays.b, arrays.stride_b},
      {},
      hw};
  if constexpr (kKind == GroupedKind::kFwdSwiglu) {
    gemm_args.epilogue = {arrays.d, arrays.stride_d};
  } else {
    gemm_args.epilogue = {{}, nullptr, arrays.stride_d, arrays.d, arrays.stride_d};
    gemm_args.epilogue.thread.alpha = 1.0f;
    gemm_args.epilogue.thread.beta = 0.0f;
  }

  typename G::Gemm gemm;
  KEYE_CHECK(gemm.can_implement(gemm_args) == cutlass::Status::kSuccess, "moe grouped GEMM (",
             GroupedGemmConfig<kKind, kConfig>::name(), "): CUTLASS cannot implement this problem");
  at::Tensor workspace = at::empty({static_cast<int64_t>(G::Gemm::get_workspace_size(gemm_args)) + 1},
                                   args.byte_options);
  auto status = gemm.initialize(gemm_args, workspace.data_ptr(), args.stream);
  KEYE_CHECK(status == cutlass::Status::kSuccess, "moe grouped GEMM: CUTLASS initialize failed: ",
             cutlassGetStatusString(status));
  status = gemm.run(args.stream);
  KEYE_CHECK(status == cutlass::Status::kSuccess, "moe grouped GEMM: CUTLASS launch failed: ",
             cutlassGetStatusString(status));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace keye::grouped

// One line per translation unit: define GroupedGemmConfig<kind, config> for one configuration.
#define KEYE_GROUPED_GEMM_CONFIG(KIND, CONFIG)                                                        \
  namespace keye {                                                                                    \
  template <>                                                                                         \
  void GroupedGemmConfig<GroupedKind::KIND, CONFIG>::run(const GroupedGemmArgs& args) {               \
    grouped::run<GroupedKind::KIND, CONFIG>(args);                                                    \
  }                                                                                                   \
  template <>                                                                                         \
  const char* GroupedGemmConfig<GroupedKind::KIND, CONFIG>::name() {                                  \
    static const std::string n = grouped::TilingFor<GroupedKind::KIND, CONFIG>::type::name();         \
    return n.c_str();                                                                                 \
  }                                                                                                   \
  }
