"""Specification of the MoE router (Qwen3-MoE / Keye-VL-2.0: softmax, top-k, renormalised).

``moe_router(logits [T, E], top_k, renormalize=True)`` returns:

* ``ids`` [T, K] int32: the K experts with the largest logits, largest first; equal logits go to the lower
  expert index first; NaN logits rank as -inf. (Selecting on logits is selecting on softmax
  probabilities, without the rounding of the exponentials deciding near-ties.)
* ``weights`` [T, K] float32: softmax(logits in fp32) at ``ids``, divided by their sum when ``renormalize``
  (``norm_topk_prob`` in Qwen3).
* ``counts`` [E] int32: slots routed to each expert (sum over t and k).
* ``prob_sum`` [E] float32: sum over tokens of the full softmax probability of each expert.

``counts`` and ``prob_sum`` are what the load-balancing loss needs (``load_balancing_loss``). Weights and
prob_sum are differentiable with respect to the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from keye.ops._checks import check_int_arg, check_tensor

MAX_EXPERTS = 512
MAX_TOP_K = 32
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class MoeRouterOutput(NamedTuple):
    weights: torch.Tensor   # [T, K] float32
    ids: torch.Tensor       # [T, K] int32
    counts: torch.Tensor    # [E] int32
    prob_sum: torch.Tensor  # [E] float32


def check_router_args(logits, top_k, op="moe_router") -> None:
    check_tensor(logits, op, "logits", FLOAT_DTYPES, 2, "[num_tokens, num_experts]")
    E = logits.shape[1]
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"keye.{op}: num_experts (logits.size(1)) must be in [1, {MAX_EXPERTS}], got {E}")
    check_int_arg(top_k, 1, min(E, MAX_TOP_K), op, "top_k")


def moe_router(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> MoeRouterOutput:
    check_router_args(logits, top_k)
    E = logits.shape[1]
    lf = logits.float()
    probs = torch.softmax(lf, dim=-1)
    ranked = torch.nan_to_num(lf, nan=float("-inf"))
    ids = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    counts = torch.bincount(ids.reshape(-1), minlength=E).int()
    return MoeRouterOutput(weights, ids.int(), counts, probs.sum(0))


def load_balancing_loss(counts: torch.Tensor, prob_sum: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Switch / Qwen3-MoE auxiliary loss: E * sum_e (counts[e] / T) * (prob_sum[e] / T).

    Equals transformers' load_balancing_loss_func for one layer without an attention mask.
    """
    E = prob_sum.shape[0]
    return E * (counts.float() * prob_sum).sum() / float(num_tokens) ** 2
