// torch element types -> CUTLASS element types with the same bits (kernels are written on CUTLASS types).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cutlass/numeric_types.h>

namespace keye {

template <typename T> struct CutlassType { using type = T; };
template <> struct CutlassType<c10::Half> { using type = cutlass::half_t; };
template <> struct CutlassType<c10::BFloat16> { using type = cutlass::bfloat16_t; };

}  // namespace keye
