# Find Torch through its CMake config (setup.py passes torch.utils.cmake_prefix_path).
#
# Two adjustments keep this working across torch 2.11-2.14 and bare CUDA installs:
#  * Torch's config uses the legacy FindCUDA, which needs CUDA_TOOLKIT_ROOT_DIR; we take it from the
#    CUDA toolkit CMake already found (CUDAToolkit).
#  * Torch's imported targets drag in libraries keye does not use (nvrtc, kineto) that a toolkit may
#    lack, so keye links the five torch/c10 libraries it needs by path instead of the `torch` target,
#    and removes the -gencode list Torch appends to CMAKE_CUDA_FLAGS (keye picks its own targets).
find_package(CUDAToolkit REQUIRED)
if(NOT CUDA_TOOLKIT_ROOT_DIR)
  get_filename_component(CUDA_TOOLKIT_ROOT_DIR "${CUDAToolkit_BIN_DIR}" DIRECTORY)
endif()
find_package(Torch REQUIRED)
string(REGEX REPLACE "-gencode[ ;=]arch=[^ ;]+" "" CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
string(REGEX REPLACE "  +" " " CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")

get_filename_component(_torch_lib_dir "${TORCH_LIBRARY}" DIRECTORY)
set(KEYE_TORCH_LIBRARIES "")
foreach(_lib torch torch_cpu torch_cuda c10 c10_cuda)
  find_library(KEYE_LIB_${_lib} NAMES ${_lib} PATHS "${_torch_lib_dir}" NO_DEFAULT_PATH REQUIRED)
  list(APPEND KEYE_TORCH_LIBRARIES "${KEYE_LIB_${_lib}}")
endforeach()
list(APPEND KEYE_TORCH_LIBRARIES CUDA::cudart)
separate_arguments(KEYE_TORCH_CXX_FLAGS UNIX_COMMAND "${TORCH_CXX_FLAGS}")
message(STATUS "keye: Torch ${Torch_VERSION} in ${_torch_lib_dir}")
