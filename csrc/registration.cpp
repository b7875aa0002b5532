// The one place where torch.ops.keye.* schemas are declared and bound to their CUDA kernels.
// Fake (meta) implementations, autograd formulas and the CPU (reference) implementations are
// registered from Python in keye/ops/, next to each op's public wrapper.
#include <torch/library.h>

#include "common/check.h"
#include "dsa_indexer/dsa_indexer.h"
#include "moe_gemm/grouped_gemm.h"
#include "moe_permute/moe_permute.h"
#include "moe_router/moe_router.h"
#include "norm/norm.h"
#include "sparse_attention/sparse_attention.h"

TORCH_LIBRARY(keye, m) {
  m.def("moe_route(Tensor topk_ids, int num_experts, int align=1) -> (Tensor dest, Tensor src, Tensor offsets)");
  m.def("moe_permute(Tensor x, Tensor dest, Tensor src, Tensor? scale=None) -> Tensor");
  m.def("moe_unpermute(Tensor y, Tensor dest, Tensor? weights=None) -> Tensor");
  m.def("moe_slot_dot(Tensor rows, Tensor dest, Tensor tokens) -> Tensor");
  m.def(
      "moe_router(Tensor logits, int top_k, bool renormalize=True) -> "
      "(Tensor weights, Tensor ids, Tensor counts, Tensor prob_sum)");
  // Expert GEMMs grouped by offsets (keye/ops/moe_gemm.py; keye/ops/moe.py composes the layer).
  m.def("moe_grouped_mm(Tensor a, Tensor b, Tensor offsets, bool trans_b=False, int config=-1) -> Tensor");
  m.def("moe_grouped_mm_wgrad(Tensor a, Tensor dy, Tensor offsets, int config=-1) -> Tensor");
  m.def("moe_grouped_mm_swiglu(Tensor a, Tensor b, Tensor offsets, int config=-1) -> Tensor");
  m.def("moe_grouped_gemm_configs(str kind) -> str[]", &keye::moe_grouped_gemm_configs);
  m.def("moe_swiglu(Tensor h) -> Tensor");
  m.def("moe_swiglu_backward(Tensor h, Tensor d_out, Tensor(a!)? a_out=None) -> Tensor");
  m.def("moe_decode_gate_up(Tensor x, Tensor ids, Tensor w, bool packed=False) -> Tensor");
  m.def("moe_decode_down(Tensor a, Tensor ids, Tensor weights, Tensor w) -> Tensor");
  m.def("moe_decode(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down, bool gate_up_packed=False) -> Tensor");
  // DSA lightning indexer building blocks (keye/ops/dsa_indexer.py composes them).
  m.def("indexer_rotate_quantize(Tensor x) -> (Tensor x8, Tensor scale)");
  m.def(
      "indexer_logits(Tensor q8, Tensor q_scale, Tensor w, Tensor k8, Tensor k_scale, int q_pos0, Tensor(a!) out) "
      "-> ()");
  m.def(
      "indexer_logits_paged(Tensor q8, Tensor q_scale, Tensor w, Tensor k_cache, Tensor k_scale_cache, "
      "Tensor block_table, Tensor seq_lens, Tensor(a!) out, Tensor(b!)? group_max=None) -> ()");
  m.def(
      "indexer_topk_paged(Tensor q8, Tensor q_scale, Tensor w, Tensor k_cache, Tensor k_scale_cache, "
      "Tensor block_table, Tensor seq_lens, int topk, Tensor(a!) scores, Tensor(b!) indices, "
      "Tensor(c!)? out_scores=None) -> ()");
  m.def(
      "topk_rows(Tensor scores, Tensor lengths, int topk, int index_offset, Tensor(a!) indices, "
      "Tensor(b!)? out_scores=None, Tensor? group_max=None) -> ()");
  m.def(
      "indexer_cache_append(Tensor k8, Tensor k_scale, Tensor(a!) k_cache, Tensor(b!) k_scale_cache, "
      "Tensor slot_mapping) -> ()");
  m.def("paged_slots(Tensor positions, Tensor block_table) -> Tensor");
  // Top-k sparse GQA attention forward and backward (keye/ops/sparse_attention.py adds autograd).
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor? row_base, float scale, "
      "int splits=1, bool pair_queries=True, bool share_blocks=True) -> (Tensor o, Tensor lse)");
  m.def(
      "sparse_attention_bwd(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor indices, Tensor? row_base, Tensor lse, "
      "Tensor delta, float scale, int splits, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, bool share_blocks=True, "
      "Tensor? fixed_scale=None) -> ()");
  m.def(
      "sparse_attention_block_plan(Tensor indices, Tensor? row_base, int num_rows) -> (Tensor common, "
      "Tensor common_len, Tensor pair_work, Tensor pair_len)");
  // RMSNorm, its residual-add form, per-head RMSNorm + RoPE and LayerNorm + RoPE (keye/ops/norm.py adds autograd).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor out, Tensor sum)");
  m.def("rms_norm_rope(Tensor x, Tensor weight, Tensor cos, Tensor sin, float eps) -> Tensor");
  m.def("layer_norm_rope(Tensor x, Tensor weight, Tensor bias, Tensor cos, Tensor sin, float eps) -> Tensor");
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
  m.impl("moe_slot_dot", &keye::moe_slot_dot_cuda);
  m.impl("moe_router", &keye::moe_router_cuda);
  m.impl("moe_grouped_mm", &keye::moe_grouped_mm_cuda);
  m.impl("moe_grouped_mm_wgrad", &keye::moe_grouped_mm_wgrad_cuda);
  m.impl("moe_grouped_mm_swiglu", &keye::moe_grouped_mm_swiglu_cuda);
  m.impl("moe_swiglu", &keye::moe_swiglu_cuda);
  m.impl("moe_swiglu_backward", &keye::moe_swiglu_backward_cuda);
  m.impl("moe_decode_gate_up", &keye::moe_decode_gate_up_cuda);
  m.impl("moe_decode_down", &keye::moe_decode_down_cuda);
  m.impl("moe_decode", &keye::moe_decode_cuda);
  m.impl("indexer_rotate_quantize", &keye::indexer_rotate_quantize_cuda);
  m.impl("indexer_logits", &keye::indexer_logits_cuda);
  m.impl("indexer_logits_paged", &keye::indexer_logits_paged_cuda);
  m.impl("indexer_topk_paged", &keye::indexer_topk_paged_cuda);
  m.impl("topk_rows", &keye::topk_rows_cuda);
  m.impl("indexer_cache_append", &keye::indexer_cache_append_cuda);
  m.impl("paged_slots", &keye::paged_slots_cuda);
  m.impl("sparse_attention_fwd", &keye::sparse_attention_fwd_cuda);
  m.impl("sparse_attention_bwd", &keye::sparse_attention_bwd_cuda);
  m.impl("sparse_attention_block_plan", &keye::sparse_attention_block_plan_cuda);
  m.impl("rms_norm", &keye::rms_norm_cuda);
  m.impl("add_rms_norm", &keye::add_rms_norm_cuda);
  m.impl("rms_norm_rope", &keye::rms_norm_rope_cuda);
  m.impl("layer_norm_rope", &keye::layer_norm_rope_cuda);
}
