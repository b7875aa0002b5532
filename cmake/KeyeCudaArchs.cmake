# KEYE_GENCODE_FLAGS: nvcc -gencode flags for the kernels.
# Default sm_90a (Hopper with wgmma/FP8; the "a" target needs the explicit -gencode form).
# Override with the environment variable KEYE_CUDA_ARCHS, a semicolon- or comma-separated list
# such as "90a" or "90a;100a". Every kernel in keye targets Hopper; other archs compile the
# portable kernels only and are for experimentation.
set(_archs "$ENV{KEYE_CUDA_ARCHS}")
if(_archs STREQUAL "")
  set(_archs "90a")
endif()
string(REPLACE "," ";" _archs "${_archs}")
set(KEYE_GENCODE_FLAGS "")
foreach(_a IN LISTS _archs)
  string(STRIP "${_a}" _a)
  if(NOT _a MATCHES "^[0-9]+[af]?$")
    message(FATAL_ERROR "KEYE_CUDA_ARCHS: '${_a}' is not an arch like 90a or 100a")
  endif()
  list(APPEND KEYE_GENCODE_FLAGS "-gencode=arch=compute_${_a},code=sm_${_a}")
endforeach()
message(STATUS "keye: CUDA targets ${KEYE_GENCODE_FLAGS}")
