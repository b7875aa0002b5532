"""Specification of the MoE token permutation (routing metadata, permute, unpermute).

Terms: T tokens, each routed to K experts (``topk_ids[t, k]``, -1 = slot not routed); E experts.
The permuted buffer holds one row per routed slot, grouped by expert, and each expert's segment is
padded to a multiple of ``align`` rows so a grouped GEMM can use whole tiles:

* ``offsets[e]`` is the first row of expert e, ``offsets[E]`` the rows in use;
  segment e is rows ``offsets[e] .. offsets[e] + count[e]`` followed by padding up to ``offsets[e+1]``.
* Within a segment, slots are ordered by flat index ``t * K + k`` (a stable sort by expert id):
  deterministic and independent of the kernel's parallel schedule.
* ``dest[t, k]`` is the row of slot (t, k), or -1 if the slot is not routed.
* ``src[r]`` is the flat slot index ``t * K + k`` stored in row r, or -1 for padding and unused rows.
  ``src`` has the static size ``T*K + E*(align-1)`` (the worst case) so nothing waits for the device.

``moe_permute(x, dest, src, scale)`` writes ``out[dest[t, k]] = scale[t, k] * x[t]`` (product in fp32,
rounded once to x's dtype; no scale means an exact copy) and zeros every row with ``src == -1``.
``moe_unpermute(y, dest, weights)`` returns ``out[t] = sum_k weights[t, k] * y[dest[t, k]]`` summed in
fp32 and rounded once; slots with ``dest == -1`` contribute nothing.
``moe_slot_dot(rows, dest, tokens)`` returns fp32 ``out[t, k] = <rows[dest[t, k]], tokens[t]>`` (0 where
``dest == -1``): the gradient of a per-slot factor (routing weight or permute scale).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from keye.ops._checks import check_index_range, check_int_arg, check_same_device, check_size, check_tensor

MAX_EXPERTS = 1024
MAX_ALIGN = 1024
MAX_TOP_K = 256
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class MoeRouting(NamedTuple):
    dest: torch.Tensor     # [T, K] int32: row of each slot, -1 = not routed
    src: torch.Tensor      # [T*K + E*(align-1)] int32: flat slot of each row, -1 = padding/unused
    offsets: torch.Tensor  # [E+1] int32: first row of each expert; offsets[E] = rows in use


def num_permuted_rows(num_slots: int, num_experts: int, align: int) -> int:
    """Static row count of the permuted buffer: every slot plus the worst-case alignment padding."""
    return num_slots + (num_experts * (align - 1) if align > 1 else 0)


def check_route_args(topk_ids, num_experts, align, op="moe_route") -> None:
    check_tensor(topk_ids, op, "topk_ids", (torch.int32, torch.int64), 2, "[num_tokens, top_k]")
    check_int_arg(num_experts, 1, MAX_EXPERTS, op, "num_experts")
    check_int_arg(align, 1, MAX_ALIGN, op, "align")
    if num_permuted_rows(topk_ids.numel(), num_experts, align) >= 2**31:
        raise ValueError(f"keye.{op}: {topk_ids.numel()} routed slots (plus padding) exceed the int32 row range")
    check_index_range(topk_ids, -1, num_experts - 1, op, "topk_ids")


def _check_dest(dest, data, data_name, op) -> None:
    check_tensor(dest, op, "dest", (torch.int32,), 2, "[num_tokens, top_k]")
    check_same_device(dest, data, op, "dest", data_name)
    if not 1 <= dest.shape[1] <= MAX_TOP_K:
        raise ValueError(f"keye.{op}: top_k (dest.size(1)) must be in [1, {MAX_TOP_K}], got {dest.shape[1]}")


def _check_slot_factors(f, dest, op, name) -> None:
    if f is None:
        return
    check_tensor(f, op, name, FLOAT_DTYPES, 2, "[num_tokens, top_k]")
    check_same_device(f, dest, op, name, "dest")
    if f.shape != dest.shape:
        raise ValueError(f"keye.{op}: argument '{name}' must have the shape of 'dest' {list(dest.shape)}, "
                         f"got {list(f.shape)}")


def check_permute_args(x, dest, src, scale, op="moe_permute") -> None:
    check_tensor(x, op, "x", FLOAT_DTYPES, 2, "[num_tokens, hidden]")
    _check_dest(dest, x, "x", op)
    check_size(dest, 0, x.shape[0], op, "dest", "num_tokens (x.size(0))")
    check_tensor(src, op, "src", (torch.int32,), 1, "[num_rows]")
    check_same_device(src, x, op, "src", "x")
    if src.shape[0] < dest.numel():
        raise ValueError(f"keye.{op}: 'src' has {src.shape[0]} rows but must have at least "
                         f"num_tokens * top_k = {dest.numel()}")
    _check_slot_factors(scale, dest, op, "scale")
    check_index_range(dest, -1, src.shape[0] - 1, op, "dest")
    check_index_range(src, -1, dest.numel() - 1, op, "src")


def check_unpermute_args(y, dest, weights, op="moe_unpermute") -> None:
    check_tensor(y, op, "y", FLOAT_DTYPES, 2, "[num_rows, hidden]")
    _check_dest(dest, y, "y", op)
    _check_slot_factors(weights, dest, op, "weights")
    check_index_range(dest, -1, y.shape[0] - 1, op, "dest")


def moe_route(topk_ids: torch.Tensor, num_experts: int, align: int = 1) -> MoeRouting:
    check_route_args(topk_ids, num_experts, align)
    T, K = topk_ids.shape
    n, E, dev = T * K, num_experts, topk_ids.device
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < E), flat, E)  # E = "not routed", sorts last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)[:E]
    padded = (counts + align - 1) // align * align
    offsets = torch.zeros(E + 1, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(padded, 0)
    first_sorted = torch.cumsum(counts, 0) - counts  # where each expert starts in `order`
    sorted_key = key[order]
    routed = sorted_key < E
    e = sorted_key.clamp(max=E - 1)
    row = offsets[e] + torch.arange(n, device=dev) - first_sorted[e]
    dest = torch.full((n,), -1, dtype=torch.long, device=dev)
    dest[order[routed]] = row[routed]
    src = torch.full((num_permuted_rows(n, E, align),), -1, dtype=torch.long, device=dev)
    src[row[routed]] = order[routed]
    return MoeRouting(dest.view(T, K).int(), src.int(), offsets.int())


def moe_permute(x: torch.Tensor, dest: torch.Tensor, src: torch.Tensor,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    check_permute_args(x, dest, src, scale)
    T, K = dest.shape
    d = dest.reshape(-1).long()
    routed = d >= 0
    rows = x.repeat_interleave(K, dim=0)  # row t*K + k is x[t]
    if scale is not None:
        rows = (rows.float() * scale.reshape(-1, 1).float()).to(x.dtype)
    out = x.new_zeros(src.shape[0], x.shape[1])
    return out.index_copy(0, d[routed], rows[routed])


def moe_unpermute(y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    check_unpermute_args(y, dest, weights)
    T, K = dest.shape
    d = dest.long()
    routed = (d >= 0).unsqueeze(-1)
    if y.shape[0] == 0:  # nothing to gather (every slot must then be -1)
        return y.new_zeros(T, y.shape[1])
    w = torch.ones(T, K, device=y.device) if weights is None else weights.float()
    rows = y.index_select(0, d.clamp(min=0).reshape(-1)).view(T, K, y.shape[1]).float()
    # where, not a multiply by 0: an unrouted slot must not turn into NaN through a non-finite row.
    return torch.where(routed, rows * w.unsqueeze(-1), 0.0).sum(1).to(y.dtype)


def check_slot_dot_args(rows, dest, tokens, op="moe_slot_dot") -> None:
    check_tensor(rows, op, "rows", FLOAT_DTYPES, 2, "[num_rows, hidden]")
    _check_dest(dest, rows, "rows", op)
    check_tensor(tokens, op, "tokens", (rows.dtype,), 2, "[num_tokens, hidden]")
    check_same_device(tokens, rows, op, "tokens", "rows")
    check_size(tokens, 0, dest.shape[0], op, "tokens", "num_tokens (dest.size(0))")
    check_size(tokens, 1, rows.shape[1], op, "tokens", "hidden (rows.size(1))")
    check_index_range(dest, -1, rows.shape[0] - 1, op, "dest")


def moe_slot_dot(rows: torch.Tensor, dest: torch.Tensor, tokens: torch.Tensor,
                 chunk_elems: int = 1 << 26) -> torch.Tensor:
    """[T, K] fp32: <rows[dest[t,k]], tokens[t]>, 0 where dest == -1.

    Token chunks bound the fp32 gather to ~chunk_elems elements (256 MB): unchunked it would be T*K*H floats,
    4.3 GB at 65536 tokens of the Qwen3 MoE layer's backward.
    """
    check_slot_dot_args(rows, dest, tokens)
    T, K = dest.shape
    out = torch.zeros(T, K, dtype=torch.float32, device=rows.device)
    if rows.shape[0] == 0:  # nothing to gather (every slot must then be -1)
        return out
    step = max(1, chunk_elems // max(1, K * rows.shape[1]))
    for t0 in range(0, T, step):
        d = dest[t0:t0 + step].long()
        g = rows.index_select(0, d.clamp(min=0).reshape(-1)).view(d.shape[0], K, -1).float()
        dots = torch.einsum("tkh,th->tk", g, tokens[t0:t0 + step].float())
        out[t0:t0 + step] = torch.where(d >= 0, dots, 0.0)
    return out
