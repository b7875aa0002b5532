"""Specification of the expert GEMMs of an MoE layer, over rows already grouped by expert (keye.ops.moe_route).

offsets [E + 1] int32: expert e owns rows offsets[e]:offsets[e+1] (non-decreasing, within [0, R]). Rows at or
past offsets[E] belong to no expert and come out zero. All products are computed in fp32 and rounded once to the
inputs' dtype (the kernels take bf16).

    moe_grouped_mm(a, b, offsets)            out[r] = a[r] @ b[e]        b [E, K, N] (the checkpoint's x @ W)
    moe_grouped_mm(a, b, offsets, True)      out[r] = a[r] @ b[e].T      b [E, N, K] (data gradient)
    moe_grouped_mm_wgrad(a, dy, offsets)     out[e] = a[rows e].T @ dy[rows e]   [E, M, N], zero if no rows
    moe_swiglu(h)                            silu(h[:, :I]) * h[:, I:]
    moe_grouped_mm_swiglu(a, packed, offsets)   silu(g) * u of a[r] @ unpack(packed)[e] (h not rounded)   [R, I]

moe_pack_gate_up(gate_up) reorders the columns of gate_up [E, H, 2I] (gate columns, then up) for the SwiGLU epilogue
of the gate_up GEMM (csrc/moe_gemm/swiglu_epilogue.cuh), I a multiple of 128: within every tile t of 256 packed
columns, packed column 8k + 2c + a (k < 32, c < 4, a < 2) is gate (k even) or up (k odd) column 128t + 32c + 2(k // 2)
+ a. moe_unpack_gate_up inverts it.

Decode-size batches skip the grouping and take the router's output directly (ids [T, K] int32, -1 = unrouted):

    moe_decode_gate_up(x, ids, w)            a[t*K + k] = silu(g) * u of x[t] @ w[ids[t, k]] (h not rounded);
                                             zero rows for unrouted slots                        [T*K, I]
    moe_decode_down(a, ids, weights, w)      out[t] = sum_k weights[t, k] * (a[t*K + k] @ w[ids[t, k]])   [T, H]
    moe_decode(x, ids, weights, gate_up, down)   one token, both and the combine without rounding a:
                                             out = sum_k weights[k] * (silu(g) * u @ down[ids[k]])        [1, H]

moe_decode_gate_up(..., packed=True) and moe_decode(..., gate_up_packed=True) take gate_up in moe_pack_gate_up's order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye.ops._checks import _fail, check_index_range, check_same_device, check_size, check_tensor

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
DECODE_MAX_ACTIVATIONS = 16384  # top_k * I: moe_decode_down stages a token's K activation rows in shared memory
# moe_decode's kernel (one token): H a multiple of 16 up to 4096 (x sits in shared memory beside the weight ring), I a
# multiple of 8 up to 2048, top_k up to 64.
DECODE_FUSED_MAX_HIDDEN = 4096
DECODE_FUSED_MAX_INTER = 2048
DECODE_FUSED_MAX_TOPK = 64
# Per layer in CUDA graphs of 8 (H200, H = 2048, 64 experts, top-8; NOTES.md, twelfth session), fused kernel vs the
# two decode kernels: 25 MB of routed weights 24.6 vs 22.6 us; Keye's 75 MB (2048/768) 31.3 vs 30.1 us, so it stays
# on the two kernels; 138 MB (2048/1408) 45.1 vs 52.9 us, so it takes the fused one. Nothing between 75 and 138 MB
# was measured; a straight line between them crosses near 84 MB.
DECODE_FUSED_MIN_WEIGHT_BYTES = 100 * 10**6


def decode_fused_supported(tokens: int, top_k: int, hidden: int, inter: int) -> bool:
    """Whether moe_decode's CUDA kernel takes this shape."""
    return (tokens == 1 and top_k <= DECODE_FUSED_MAX_TOPK
            and hidden % 16 == 0 and 0 < hidden <= DECODE_FUSED_MAX_HIDDEN
            and inter % 8 == 0 and 0 < inter <= DECODE_FUSED_MAX_INTER)


def decode_fused_preferred(tokens: int, top_k: int, hidden: int, inter: int) -> bool:
    """Whether keye.ops.moe runs this decode shape on moe_decode's kernel (supported, and the routed weights are
    large enough for its fixed cost to pay)."""
    return (decode_fused_supported(tokens, top_k, hidden, inter)
            and top_k * 3 * hidden * inter * 2 >= DECODE_FUSED_MIN_WEIGHT_BYTES)


def check_offsets(offsets, rows: int, experts: int | None, op: str, ref, ref_name: str = "a") -> None:
    check_tensor(offsets, op, "offsets", (torch.int32,), 1, "[E + 1]")
    check_same_device(offsets, ref, op, "offsets", ref_name)
    if offsets.numel() < 2:
        _fail(op, f"argument 'offsets' must hold E + 1 >= 2 values, got {offsets.numel()}")
    if experts is not None:
        check_size(offsets, 0, experts + 1, op, "offsets", "E + 1 (b.size(0) + 1)")
    check_index_range(offsets, 0, rows, op, "offsets")
    check_index_range(offsets[1:] - offsets[:-1], 0, rows, op, "offsets (differences)")


def _groups(offsets: torch.Tensor):
    bounds = offsets.tolist()
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def _grouped(a, b, offsets, trans_b, op) -> torch.Tensor:
    """fp32 [R, N] result (rows outside every expert zero)."""
    check_tensor(a, op, "a", FLOATS, 2, "[R, K]")
    check_tensor(b, op, "b", FLOATS, 3, "[E, N, K]" if trans_b else "[E, K, N]")
    check_same_device(b, a, op, "b", "a")
    check_size(b, 2 if trans_b else 1, a.shape[1], op, "b", "K (a.size(1))")
    check_offsets(offsets, a.shape[0], b.shape[0], op, a)
    n = b.shape[1] if trans_b else b.shape[2]
    out = torch.zeros(a.shape[0], n, dtype=torch.float32, device=a.device)
    for e, r0, r1 in _groups(offsets):
        w = b[e].float()
        out[r0:r1] = a[r0:r1].float() @ (w.T if trans_b else w)
    return out


def moe_grouped_mm(a, b, offsets, trans_b: bool = False) -> torch.Tensor:
    return _grouped(a, b, offsets, trans_b, "moe_grouped_mm").to(a.dtype)


def moe_grouped_mm_wgrad(a, dy, offsets) -> torch.Tensor:
    op = "moe_grouped_mm_wgrad"
    check_tensor(a, op, "a", FLOATS, 2, "[R, M]")
    check_tensor(dy, op, "dy", FLOATS, 2, "[R, N]")
    check_same_device(dy, a, op, "dy", "a")
    check_size(dy, 0, a.shape[0], op, "dy", "the rows of a")
    check_offsets(offsets, a.shape[0], None, op, a)
    out = torch.zeros(offsets.numel() - 1, a.shape[1], dy.shape[1], dtype=torch.float32, device=a.device)
    for e, r0, r1 in _groups(offsets):
        out[e] = a[r0:r1].float().T @ dy[r0:r1].float()
    return out.to(a.dtype)


def _check_gate_up(h, op) -> None:
    check_tensor(h, op, "h", FLOATS, 2, "[R, 2I] (gate columns, then up columns)")
    if h.shape[1] % 2:
        _fail(op, f"argument 'h' must have an even number of columns (2I), got shape {list(h.shape)}")


def _swiglu_fp32(h: torch.Tensor) -> torch.Tensor:
    g, u = h.float().chunk(2, dim=1)
    return F.silu(g) * u


def moe_swiglu(h) -> torch.Tensor:
    _check_gate_up(h, "moe_swiglu")
    return _swiglu_fp32(h).to(h.dtype)


def moe_swiglu_backward(h, d_out, a_out=None) -> torch.Tensor:
    """The gradient w.r.t. h; a_out (optional, [R, I]) also receives moe_swiglu(h)."""
    op = "moe_swiglu_backward"
    _check_gate_up(h, op)
    for name, t in (("d_out", d_out), ("a_out", a_out)):
        if t is None:
            continue
        check_tensor(t, op, name, FLOATS, 2, "[R, I]")
        check_same_device(t, h, op, name, "h")
        check_size(t, 0, h.shape[0], op, name, "the rows of h")
        check_size(t, 1, h.shape[1] // 2, op, name, "I (h.size(1) / 2)")
    g, u = h.float().chunk(2, dim=1)
    d, s = d_out.float(), torch.sigmoid(g)
    # d/dg silu(g) = s (1 + g (1 - s)); tests check this against autograd.
    dh = torch.cat([d * u * s * (1 + g * (1 - s)), d * g * s], dim=1)
    if a_out is not None:
        a_out.copy_(g * s * u)
    return dh.to(h.dtype)


PACK_TILE = 256  # packed columns per tile (kPackedGateUpTile in csrc/moe_gemm/packed_gate_up.cuh)


def gate_up_pack_order(inter: int, device=None) -> torch.Tensor:
    """src [2I] int64: packed column p holds column src[p] of the [gate | up] layout (moe_pack_gate_up's order)."""
    if inter <= 0 or (2 * inter) % PACK_TILE:
        raise ValueError(f"keye.moe_pack_gate_up: the intermediate size I must be a positive multiple of "
                         f"{PACK_TILE // 2}, got {inter}")
    p = torch.arange(2 * inter, device=device)
    t, q = p // PACK_TILE, p % PACK_TILE
    k, c, a = q // 8, (q % 8) // 2, q % 2
    return (k % 2) * inter + t * (PACK_TILE // 2) + 32 * c + 2 * (k // 2) + a


def _check_gate_up_weights(w, op: str, name: str) -> None:
    check_tensor(w, op, name, FLOATS, 3, "[E, H, 2I]")
    if w.shape[2] % PACK_TILE:
        _fail(op, f"argument '{name}' must have 2I a multiple of {PACK_TILE}, got shape {list(w.shape)}")


def moe_pack_gate_up(gate_up) -> torch.Tensor:
    _check_gate_up_weights(gate_up, "moe_pack_gate_up", "gate_up")
    return gate_up.index_select(2, gate_up_pack_order(gate_up.shape[2] // 2, gate_up.device))


def moe_unpack_gate_up(packed) -> torch.Tensor:
    _check_gate_up_weights(packed, "moe_unpack_gate_up", "packed")
    out = torch.empty_like(packed)
    out[:, :, gate_up_pack_order(packed.shape[2] // 2, packed.device)] = packed
    return out


def moe_grouped_mm_swiglu(a, packed, offsets) -> torch.Tensor:
    op = "moe_grouped_mm_swiglu"
    return _swiglu_fp32(_grouped(a, _unpack_for(packed, op, "b"), offsets, False, op)).to(a.dtype)


def _unpack_for(packed, op: str, name: str) -> torch.Tensor:
    """The checkpoint-order weights of an op's packed argument (validated under the op's and argument's names)."""
    _check_gate_up_weights(packed, op, name)
    return moe_unpack_gate_up(packed)


def _check_decode_ids(ids, ref, ref_name: str, experts: int, op: str) -> None:
    check_tensor(ids, op, "ids", (torch.int32,), 2, "[T, top_k]")
    check_same_device(ids, ref, op, "ids", ref_name)
    if ids.shape[1] < 1:
        _fail(op, f"top_k must be >= 1, got {ids.shape[1]}")
    check_index_range(ids, -1, experts - 1, op, "ids")


def _check_decode_weights(w, ref, ref_name: str, reduction: int, op: str, layout: str, name: str = "w") -> None:
    check_tensor(w, op, name, FLOATS, 3, layout)
    check_same_device(w, ref, op, name, ref_name)
    check_size(w, 1, reduction, op, name, "the activation width")


def _check_routing_weights(weights, ids, ref, ref_name: str, op: str) -> None:
    check_tensor(weights, op, "weights", (torch.float32,), 2, "[T, top_k]")
    check_same_device(weights, ref, op, "weights", ref_name)
    if weights.shape != ids.shape:
        _fail(op, f"argument 'weights' must have the shape of 'ids' {list(ids.shape)}, got {list(weights.shape)}")


def moe_decode_gate_up(x, ids, w, packed: bool = False) -> torch.Tensor:
    op = "moe_decode_gate_up"
    check_tensor(x, op, "x", FLOATS, 2, "[T, H]")
    _check_decode_weights(w, x, "x", x.shape[1], op, "[E, H, 2I]")
    if packed:
        w = _unpack_for(w, op, "w")
    _check_decode_ids(ids, x, "x", w.shape[0], op)
    check_size(ids, 0, x.shape[0], op, "ids", "the token count (x.size(0))")
    K = ids.shape[1]
    a = _per_expert(ids, w.shape[2] // 2, lambda e, slots: _swiglu_fp32(x[slots // K].float() @ w[e].float()))
    return a.to(x.dtype)


def moe_decode_down(a, ids, weights, w) -> torch.Tensor:
    op = "moe_decode_down"
    check_tensor(a, op, "a", FLOATS, 2, "[T * top_k, I]")
    _check_decode_weights(w, a, "a", a.shape[1], op, "[E, I, H]")
    _check_decode_ids(ids, a, "a", w.shape[0], op)
    check_size(a, 0, ids.numel(), op, "a", "T * top_k (ids.numel())")
    if ids.shape[1] * a.shape[1] > DECODE_MAX_ACTIVATIONS:
        _fail(op, f"top_k * I must be at most {DECODE_MAX_ACTIVATIONS} (a token's activation rows are staged in "
                  f"shared memory), got {ids.shape[1]} * {a.shape[1]}")
    _check_routing_weights(weights, ids, a, "a", op)
    T, K = ids.shape
    y = _per_expert(ids, w.shape[2], lambda e, slots: a[slots].float() @ w[e].float())
    return (y.view(T, K, -1) * weights.unsqueeze(2)).sum(1).to(a.dtype)


def moe_decode(x, ids, weights, gate_up, down, gate_up_packed: bool = False) -> torch.Tensor:
    op = "moe_decode"
    check_tensor(x, op, "x", FLOATS, 2, "[1, H]")
    if x.shape[0] != 1:
        _fail(op, f"argument 'x' must hold one token [1, H], got shape {list(x.shape)}; batches take "
                  "keye.ops.moe_decode_gate_up and moe_decode_down (keye.ops.moe picks them)")
    H = x.shape[1]
    _check_decode_weights(gate_up, x, "x", H, op, "[E, H, 2I]", name="gate_up")
    if gate_up_packed:
        gate_up = _unpack_for(gate_up, op, "gate_up")
    E, I = gate_up.shape[0], gate_up.shape[2] // 2
    _check_decode_weights(down, x, "x", I, op, "[E, I, H]", name="down")
    check_size(down, 0, E, op, "down", "the expert count (gate_up.size(0))")
    check_size(down, 2, H, op, "down", "the hidden size (x.size(1))")
    _check_decode_ids(ids, x, "x", E, op)
    check_size(ids, 0, 1, op, "ids", "the token count (x.size(0))")
    _check_routing_weights(weights, ids, x, "x", op)
    a = _per_expert(ids, I, lambda e, slots: _swiglu_fp32(x.float() @ gate_up[e].float()))  # not rounded
    y = _per_expert(ids, H, lambda e, slots: a[slots] @ down[e].float())
    return (y * weights.reshape(-1, 1)).sum(0, keepdim=True).to(x.dtype)


def _per_expert(ids, cols: int, rows_of) -> torch.Tensor:
    """fp32 [T*K, cols]: rows_of(e, slots) for the flat slots routed to each expert e; zero rows for unrouted ones."""
    flat = ids.reshape(-1).long()
    out = torch.zeros(flat.numel(), cols, dtype=torch.float32, device=ids.device)
    for e in torch.unique(flat[flat >= 0]).tolist():
        slots = (flat == e).nonzero(as_tuple=True)[0]
        out[slots] = rows_of(e, slots)
    return out
