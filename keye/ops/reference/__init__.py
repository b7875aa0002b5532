"""Pure-PyTorch references: the specification of every keye op, runnable on CPU and GPU."""

from keye.ops.reference.moe_permute import moe_permute, moe_route, moe_unpermute

__all__ = ["moe_route", "moe_permute", "moe_unpermute"]
