"""Pure-PyTorch references: the specification of every keye op, runnable on CPU and GPU."""

from keye.ops.reference.moe_permute import moe_permute, moe_route, moe_slot_dot, moe_unpermute
from keye.ops.reference.moe_router import load_balancing_loss, moe_router
from keye.ops.reference.moe import moe
from keye.ops.reference.norm import add_rms_norm, layer_norm_rope, rms_norm, rms_norm_rope
from keye.ops.reference import dsa_indexer, dsa_indexer_loss, sparse_attention

__all__ = ["moe_route", "moe_permute", "moe_unpermute", "moe_slot_dot", "moe_router", "load_balancing_loss", "moe",
           "dsa_indexer", "dsa_indexer_loss", "sparse_attention", "rms_norm", "add_rms_norm", "rms_norm_rope",
           "layer_norm_rope"]
