// The gate_up GEMM's SwiGLU epilogue: out[r, j] = silu(g) * u of the fp32 accumulators, rounded once to bf16, for
// the grouped GEMM over weights in moe_pack_gate_up's column order (packed_gate_up.cuh).
//
// Why that order: a Hopper wgmma accumulator (m64nNk16) gives each thread columns 8k + 2c + a of the tile, c = its
// lane % 4, for every k, so each thread holds the gate and the up value of the same output column (k = 2j and
// 2j + 1), and its 32 output columns 32c .. 32c + 31 are contiguous: four 16-byte stores per row. The output is
// [R, I]; the [R, 2I] intermediate h is never written.
//
// A CUTLASS "operator-style" epilogue (the shape of cutlass::epilogue::collective::DefaultEpilogueArray), wrapped in
// Sm90TmaWarpSpecializedAdapter for the ptr-array warp-specialised kernels: no shared memory, stores straight from
// the accumulator registers.
//
// Measured (H200, Keye layer forward, kernels summed; NOTES.md, thirtieth session): 16K tokens 2.428 -> 2.280 ms
// against the plain GEMM + SwiGLU kernel; the fused GEMM alone is faster than the plain GEMM alone (half the output).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/detail.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/numeric_types.h>

#include <cuda_bf16.h>

#include "moe_gemm/grouped_gemm_args.h"
#include "moe_gemm/packed_gate_up.cuh"

namespace keye::grouped {

constexpr int kSwigluTileN = kPackedGateUpTile;

template <class StrideD_>
class SwigluEpilogueArray {
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using ElementOutput = cutlass::bfloat16_t;
  using ElementC = void;  // no source operand
  using ElementD = cutlass::bfloat16_t;
  using StrideC = StrideD_;
  using StrideD = StrideD_;
  using InternalStrideC = cute::remove_pointer_t<StrideC>;
  using InternalStrideD = cute::remove_pointer_t<StrideD>;
  using GmemElementC = ElementD;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  // Only named by CUTLASS's device adapter (as EpilogueOutputOp); never instantiated.
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<ElementD, 1, float, float>;

  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;

  struct Arguments {
    ElementD** ptr_D = nullptr;  // per group: [rows, I] row-major
    StrideD dD{};
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr_D != nullptr;
  }

  CUTLASS_HOST_DEVICE explicit SwigluEpilogueArray(Params const& params) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    static_assert(size<1>(BlockShapeMNK{}) == kSwigluTileN, "the SwiGLU epilogue needs 256-column tiles");
    // The accumulator fragment of an m64n256 wgmma: values (a: column pair, b: row + 8, k: 8-column group), then
    // the atoms along M and N (one per thread here: 2 warpgroups x 64 rows = 128).
    static_assert(rank<0>(FrgLayout{}) == 3 && size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2 &&
                      size<0, 2>(FrgLayout{}) == kSwigluTileN / 8 && size<1>(FrgLayout{}) == 1 &&
                      size<2>(FrgLayout{}) == 1,
                  "unexpected wgmma accumulator layout for the SwiGLU epilogue");

    const int M = get<0>(problem_shape_mnkl);
    const auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    // A 1 x 2 cluster rounds an odd number of N tiles up: the extra tile lies past 2I (its B was zero-filled) and
    // writes nothing (2I is a multiple of 256, so a tile is either inside or past it).
    if (int64_t{n_coord} * kSwigluTileN >= get<1>(problem_shape_mnkl)) return;
    // Where this thread's values sit in the tile: the coordinates of value (a = 0, b = 0, k = 0).
    Tensor coords = tiled_mma.get_thread_slice(thread_idx).partition_C(make_identity_tensor(take<0, 2>(blk_shape_mnk)));
    const int row0 = get<0>(coords(0));
    const int c = get<1>(coords(0)) / 2;  // lane % 4: the thread's column pair within each 8-column group
    const int64_t ld = get<0>(params_.dD[l_coord]);
    ElementD* out = params_.ptr_D[l_coord];
    const int64_t col0 = int64_t{n_coord} * (kSwigluTileN / 2) + 32 * c;

    CUTLASS_PRAGMA_UNROLL
    for (int b = 0; b < 2; ++b) {
      const int64_t row = int64_t{m_coord} * size<0>(BlockShapeMNK{}) + row0 + 8 * b;
      // 32 consecutive outputs: j = column pair, a = column within it.
      alignas(16) __nv_bfloat162 vals[16];
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < 16; ++j) {
        float r[2];
        CUTLASS_PRAGMA_UNROLL
        for (int a = 0; a < 2; ++a) {
          const float g = acc(make_coord(make_coord(a, b, 2 * j), 0, 0));
          const float u = acc(make_coord(make_coord(a, b, 2 * j + 1), 0, 0));
          // Approximate division (MUFU.RCP + FMUL): an IEEE '/' compiles to a called slow-path region per value,
          // which made this epilogue ~4x its arithmetic (twenty-ninth session). Relative error ~2^-21, far below
          // the bf16 rounding that follows; a huge 1 + e^-g (g < -87) gives 0, the limit of silu.
          r[a] = __fdividef(g * u, 1.f + __expf(-g));
        }
        vals[j] = __floats2bfloat162_rn(r[0], r[1]);
      }
      if (row < M) {
        uint4* dst = reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(out) + row * ld + col0);
        const uint4* src = reinterpret_cast<const uint4*>(vals);
        CUTLASS_PRAGMA_UNROLL
        for (int q = 0; q < 4; ++q) __stcg(dst + q, src[q]);  // st.global (a generic store otherwise)
      }
    }
  }

 private:
  Params params_;
};

}  // namespace keye::grouped
