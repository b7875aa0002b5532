// Argument validation shared by every keye op. Each check names the op and the argument,
// says what was expected and what arrived, so a bad call fails with an actionable message.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>
#include <type_traits>

namespace keye {

// Error messages are built by plain string appends (std::to_string for numbers) and handed to
// TORCH_CHECK_VALUE as one std::string, which c10 passes through without a std::ostringstream.
// Streaming numbers through c10::str crashed inside the extension on the H200 image (torch 2.11;
// see NOTES.md), while strings alone did not.
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) { s += std::to_string(v); }

template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

}  // namespace keye

// TORCH_CHECK_VALUE (raises ValueError in Python) with a message assembled by keye::cat.
#define KEYE_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, ::keye::cat(__VA_ARGS__))

namespace keye {

// dtype names as Python spells them (torch.int32 -> "int32"), so messages match the references'.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

// "[4, 2]": shapes and strides formatted here rather than through c10's ArrayRef stream operator.
inline std::string dims_str(c10::IntArrayRef dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

inline std::string dtype_list(std::initializer_list<at::ScalarType> types) {
  std::string s;
  for (auto t : types) {
    if (!s.empty()) s += " or ";
    s += dtype_name(t);
  }
  return s;
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  KEYE_CHECK(t.defined(), "keye.", op, ": argument '", name, "' is undefined");
  KEYE_CHECK(t.is_cuda(), "keye.", op, ": argument '", name, "' must be a CUDA tensor, got device ", t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  KEYE_CHECK(t.device() == ref.device(), "keye.", op, ": argument '", name, "' is on ", t.device(), " but '",
              ref_name, "' is on ", ref.device(), "; all tensors must be on one device");
}

inline void check_dtype(const at::Tensor& t, std::initializer_list<at::ScalarType> allowed, const char* op,
                        const char* name) {
  for (auto a : allowed)
    if (t.scalar_type() == a) return;
  KEYE_CHECK(false, "keye.", op, ": argument '", name, "' must have dtype ", dtype_list(allowed), ", got ",
                    dtype_name(t.scalar_type()));
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  KEYE_CHECK(t.dim() == dim, "keye.", op, ": argument '", name, "' must be ", dim, "-D ", layout, ", got shape ",
              dims_str(t.sizes()));
}

inline void check_size(const at::Tensor& t, int64_t d, int64_t expected, const char* op, const char* name,
                       const char* what) {
  KEYE_CHECK(t.size(d) == expected, "keye.", op, ": argument '", name, "' has size ", t.size(d), " in dim ", d,
              " but ", what, " is ", expected, " (shape ", dims_str(t.sizes()), ")");
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  KEYE_CHECK(t.is_contiguous(), "keye.", op, ": argument '", name, "' must be contiguous, got strides ",
              dims_str(t.strides()), " for shape ", dims_str(t.sizes()), " (call .contiguous())");
}

// Rows may be strided (views into a larger buffer) but each row must be dense.
inline void check_row_major_rows(const at::Tensor& t, const char* op, const char* name) {
  KEYE_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "keye.", op, ": argument '", name,
              "' must have unit stride in its last dim, got strides ", dims_str(t.strides()));
}

// Value-range checks cost a device->host sync, so they follow a switch (keye.ops.index_checks)
// and are skipped while a CUDA graph is being captured. Kernels never access memory out of
// bounds either way; the checks turn a bad index into an error instead of a silently dropped row.
bool index_checks_enabled();
void set_index_checks_enabled(bool enabled);

// Raises unless every value of `t` lies in [lo, hi]; no-op when checks are off or capturing.
void check_index_range(const at::Tensor& t, int64_t lo, int64_t hi, const char* op, const char* name);

}  // namespace keye
