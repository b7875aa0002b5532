// Host side of TMA tensor copies: a 2-D tensor map (CUtensorMap) over a row-major byte array, built through the
// CUDA driver's cuTensorMapEncodeTiled (reached via the runtime's entry-point query, so the extension does not
// link libcuda itself).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/check.h"

namespace keye {

// Boxes of box_rows x row_bytes out of a row-major [rows, row_bytes] byte array at base, landing in shared memory
// in the swizzle that matches the row width (32, 64 or 128 bytes: the K-major layouts smem_desc in common/wgmma.cuh
// describes). Rows outside [0, rows) read as zeros. base must be 16-byte aligned, rows in [1, 2^31).
inline CUtensorMap byte_rows_tensor_map(const void* base, int64_t rows, int row_bytes, int box_rows, const char* op) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
    KEYE_CHECK(err == cudaSuccess && found == cudaDriverEntryPointSuccess && fn != nullptr,
               "keye: the CUDA driver does not provide cuTensorMapEncodeTiled (TMA needs a CUDA 12+ driver)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  KEYE_CHECK(row_bytes == 32 || row_bytes == 64 || row_bytes == 128, "keye.", op, ": TMA rows of ", row_bytes,
             " bytes (32, 64 or 128 supported)");
  KEYE_CHECK(rows >= 1 && rows < (int64_t{1} << 31), "keye.", op, ": ", rows,
             " key rows; the TMA copies address rows with 32-bit coordinates (1 to 2^31 - 1 rows)");
  const CUtensorMapSwizzle swizzle = row_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : row_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                       : CU_TENSOR_MAP_SWIZZLE_32B;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(row_bytes), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(row_bytes), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  CUtensorMap map;
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box,
                            element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  KEYE_CHECK(r == CUDA_SUCCESS, "keye.", op, ": cuTensorMapEncodeTiled failed with CUresult ", static_cast<int>(r),
             " (", rows, " rows of ", row_bytes, " bytes)");
  return map;
}

}  // namespace keye
