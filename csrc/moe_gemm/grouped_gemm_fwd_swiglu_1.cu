// Grouped GEMM gate_up + SwiGLU, configuration 1 (see grouped_gemm_kernel.cuh): its own translation unit to compile
// in parallel.
#include "moe_gemm/grouped_gemm_kernel.cuh"

KEYE_GROUPED_GEMM_CONFIG(kFwdSwiglu, 1)
