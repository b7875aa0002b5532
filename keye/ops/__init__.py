"""keye ops: each runs its CUDA kernel on CUDA tensors when the extension is built, else its reference.

See keye/ops/_dispatch.py for the switch (force_reference) and keye/ops/_checks.py for index_checks.
"""

from keye.ops import reference
from keye.ops._checks import index_checks
from keye.ops._dispatch import force_reference, use_kernel
from keye.ops.moe_permute import MoeRouting, moe_permute, moe_route, moe_slot_dot, moe_unpermute, src_from_dest
from keye.ops.moe_router import MoeRouterOutput, load_balancing_loss, moe_router
from keye.ops.moe_gemm import (
    moe_decode, moe_decode_down, moe_decode_gate_up, moe_grouped_gemm_configs, moe_grouped_mm, moe_grouped_mm_swiglu,
    moe_grouped_mm_wgrad, moe_pack_gate_up, moe_swiglu, moe_swiglu_backward, moe_unpack_gate_up,
)
from keye.ops.moe import moe
from keye.ops.norm import add_rms_norm, layer_norm_rope, rms_norm, rms_norm_rope

from keye.ops.dsa_indexer import (
    indexer_cache_append, indexer_rotate_quantize, indexer_topk_decode, indexer_topk_prefill,
)
from keye.ops.sparse_attention import sparse_attention, sparse_attention_decode
# The indexer's training losses: restructured PyTorch (gradients computed chunk by chunk in the forward); no
# hand-written kernel yet. keye.ops.reference.dsa_indexer_loss is their specification.
from keye.ops.dsa_indexer_loss import indexer_loss

__all__ = [
    "reference", "index_checks", "force_reference", "use_kernel",
    "MoeRouting", "moe_route", "moe_permute", "moe_unpermute", "moe_slot_dot", "src_from_dest",
    "MoeRouterOutput", "moe_router", "load_balancing_loss", "moe",
    "moe_grouped_mm", "moe_grouped_mm_wgrad", "moe_grouped_mm_swiglu", "moe_pack_gate_up", "moe_unpack_gate_up",
    "moe_swiglu", "moe_swiglu_backward", "moe_decode_gate_up",
    "moe_decode_down", "moe_decode", "moe_grouped_gemm_configs",
    "indexer_rotate_quantize", "indexer_topk_prefill", "indexer_topk_decode", "indexer_cache_append", "indexer_loss",
    "sparse_attention", "sparse_attention_decode", "rms_norm", "add_rms_norm", "rms_norm_rope",
    "layer_norm_rope",
]
