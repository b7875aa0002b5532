// keye.ops.moe_pack_gate_up's column order (specification: keye/ops/reference/moe_gemm.py), for every kernel that
// reads packed gate_up weights (the SwiGLU epilogue of the grouped GEMM, the decode kernels):
//
//   within every 256-column tile t of the packed [.., 2I], column 8k + 2c + a (k < 32, c < 4, a < 2) holds gate
//   (k even) or up (k odd) column 128t + 32c + 2 * (k / 2) + a of the checkpoint's [gate | up] layout.
//
// So output column j = 128t + 32c + 2m + a has its gate value at packed column 256t + 16m + 2c + a and its up value
// 8 columns further; each 16-byte run of 8 packed columns is all gate or all up values.
#pragma once

namespace keye {

constexpr int kPackedGateUpTile = 256;  // packed columns per tile: 128 gate + 128 up

// The packed column of output column j's gate value (its up value: + kPackedUpOffset).
__host__ __device__ constexpr int packed_gate_column(int j) {
  return 2 * (j & ~127) + 16 * ((j & 31) >> 1) + 2 * ((j & 127) >> 5) + (j & 1);
}
constexpr int kPackedUpOffset = 8;

static_assert(packed_gate_column(0) == 0 && packed_gate_column(1) == 1 && packed_gate_column(2) == 16 &&
                  packed_gate_column(32) == 2 && packed_gate_column(127) == 16 * 15 + 6 + 1 &&
                  packed_gate_column(128) == 256,
              "packed_gate_column must follow the order above");

}  // namespace keye
