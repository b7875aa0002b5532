# CUTLASS/CuTe headers come from the PyPI package nvidia-cutlass
# (cutlass_library/source/include and source/tools/util/include).
# Pass -DCUTLASS_INCLUDE_DIRS to use other headers; else Python locates the package (without importing it).
if(NOT CUTLASS_INCLUDE_DIRS)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
      "import os, importlib.util as u; s = u.find_spec('cutlass_library'); r = os.path.join(list(s.submodule_search_locations)[0], 'source'); print(os.path.join(r, 'include') + ';' + os.path.join(r, 'tools', 'util', 'include'))"
    OUTPUT_VARIABLE CUTLASS_INCLUDE_DIRS OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "keye: CUTLASS headers not found. Install them with `pip install nvidia-cutlass` "
                        "or pass -DCUTLASS_INCLUDE_DIRS=<include;tools/util/include>.")
  endif()
endif()
foreach(_d IN LISTS CUTLASS_INCLUDE_DIRS)
  if(NOT EXISTS "${_d}")
    message(FATAL_ERROR "keye: CUTLASS include dir '${_d}' does not exist")
  endif()
endforeach()
list(GET CUTLASS_INCLUDE_DIRS 0 _inc)
if(NOT EXISTS "${_inc}/cutlass/cutlass.h")
  message(FATAL_ERROR "keye: '${_inc}' holds no cutlass/cutlass.h")
endif()
message(STATUS "keye: CUTLASS headers ${CUTLASS_INCLUDE_DIRS}")
