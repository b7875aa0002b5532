// The one place where torch.ops.keye.* schemas are declared and bound to their CUDA kernels.
// Fake (meta) implementations, autograd formulas and the CPU (reference) implementations are
// registered from Python in keye/ops/, next to each op's public wrapper.
#include <torch/library.h>

#include "common/check.h"
#include "moe_permute/moe_permute.h"
#include "moe_router/moe_router.h"

TORCH_LIBRARY(keye, m) {
  m.def("moe_route(Tensor topk_ids, int num_experts, int align=1) -> (Tensor dest, Tensor src, Tensor offsets)");
  m.def("moe_permute(Tensor x, Tensor dest, Tensor src, Tensor? scale=None) -> Tensor");
  m.def("moe_unpermute(Tensor y, Tensor dest, Tensor? weights=None) -> Tensor");
  m.def(
      "moe_router(Tensor logits, int top_k, bool renormalize=True) -> "
      "(Tensor weights, Tensor ids, Tensor counts, Tensor prob_sum)");
  // Process-wide switch for the value-range checks that need a device->host sync; returns the old value.
  m.def("set_index_checks(bool enabled) -> bool", [](bool enabled) {
    const bool old = keye::index_checks_enabled();
    keye::set_index_checks_enabled(enabled);
    return old;
  });
}

TORCH_LIBRARY_IMPL(keye, CUDA, m) {
  m.impl("moe_route", &keye::moe_route_cuda);
  m.impl("moe_permute", &keye::moe_permute_cuda);
  m.impl("moe_unpermute", &keye::moe_unpermute_cuda);
  m.impl("moe_router", &keye::moe_router_cuda);
}
