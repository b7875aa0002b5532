"""Keye-VL-2.0 attention: Qwen3 GQA (per-head q/k RMSNorm, M-RoPE) with DeepSeek Sparse Attention.

The lightning indexer (``sa_indexer``) scores earlier tokens from the layer input x; every query then attends,
with all heads, only to its top-k set (``index_topk``, 2048 in the release). Modes (``AttentionContext.mode``):

* ``"auto"``   DSA as released: dense attention while the longest sequence of the step fits in top-k (then the
  top-k set is every causal position, so dense is the same result), sparse otherwise;
* ``"sparse"`` always through the indexer + sparse attention (to test it against dense on short inputs);
* ``"dense"``  never uses the indexer (sglang's fallback; the dense baseline).

Two ways through: without a cache, a packed batch of whole sequences (cu_seqlens); with a ``PagedKVCache``,
n new tokens per sequence (chunked prefill, decode) whose K/V and index keys are appended before attending.
In "auto"/"sparse" the index keys are always written to the cache, so a sequence that grows past top-k
later finds them there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import keye.ops
from keye.model.cache import CacheStep, PagedKVCache
from keye.model.config import KeyeConfig
from keye.model.norm import RMSNorm
from keye.ops.reference.dsa_indexer import PAGE_SIZE

MODES = ("auto", "sparse", "dense")
SCORE_BYTES = 1 << 30  # indexer score rows of one cached query block (the memory plan counts this)


@dataclass
class AttentionContext:
    """What every layer's attention needs besides its input (built once per forward by the language model)."""
    cos: torch.Tensor                  # [T, head_dim] fp32
    sin: torch.Tensor
    index_cos: torch.Tensor            # [T, indexer_head_dim] fp32
    index_sin: torch.Tensor
    mode: str
    cu_seqlens: torch.Tensor | None    # no cache: int32 [B + 1] of the packed sequences
    seq_bounds: list[int] | None       # cu_seqlens as a list
    cache: PagedKVCache | None = None
    step: CacheStep | None = None

    @property
    def max_len(self) -> int:
        if self.step is not None:
            return self.step.max_seq_len
        return max(b - a for a, b in zip(self.seq_bounds[:-1], self.seq_bounds[1:]))


# ---- modules ------------------------------------------------------------------------------------------------

class Indexer(nn.Module):
    """The lightning indexer: H_I query heads + per-head weights from q_proj, one shared key from k_proj."""

    def __init__(self, config: KeyeConfig):
        super().__init__()
        self.heads, self.dim = config.indexer_num_heads, config.indexer_head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.dim + self.heads, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.dim, bias=False)
        self.q_norm = RMSNorm(self.dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.dim, eps=1e-6)

    def forward(self, x, cos, sin):
        """x [T, hidden] -> q8 [T, H_I, D_I] fp8, q_scale [T, H_I], w [T, H_I], k8 [T, D_I] fp8, k_scale [T]."""
        return self.from_projections(self.q_proj(x), self.k_proj(x), cos, sin)

    def from_projections(self, qw, k, cos, sin):
        """The same from q_proj(x) [T, H_I * D_I + H_I] and k_proj(x) [T, D_I] (rows may be strided views)."""
        T = qw.shape[0]
        q = keye.ops.rms_norm_rope(qw[:, : self.heads * self.dim].reshape(T, self.heads, self.dim),
                                   self.q_norm.weight, cos, sin, self.q_norm.eps)
        w = qw[:, self.heads * self.dim:]  # raw per-head weights (no softmax / sigmoid)
        k = keye.ops.layer_norm_rope(k.view(T, 1, self.dim), self.k_norm.weight, self.k_norm.bias, cos, sin,
                                     self.k_norm.eps)  # fp32
        q8, q_scale = keye.ops.indexer_rotate_quantize(q)
        k8, k_scale = keye.ops.indexer_rotate_quantize(k.view(T, self.dim))
        return q8, q_scale, w, k8, k_scale


def _plain_weights(linears: tuple[nn.Linear, ...]) -> bool:
    """Whether every weight is an ordinary materialised tensor (not meta, not a sharded DTensor under FSDP)."""
    return all(type(lin.weight.data) is torch.Tensor and not lin.weight.is_meta for lin in linears)


def _packed_weight(linears: tuple[nn.Linear, ...]) -> torch.Tensor | None:
    """The linears' weights as one [sum of outputs, in] tensor when they are consecutive rows of one buffer
    (Attention.pack_input_projections), else None. Checked on every call: a weight replaced since (load_checkpoint's
    assignment, .to(), FSDP) simply takes the per-linear path; an in-place update (load_state_dict) is seen."""
    if not _plain_weights(linears):
        return None
    w0 = linears[0].weight
    storage, offset = w0.untyped_storage().data_ptr(), w0.storage_offset()
    for lin in linears:
        w = lin.weight
        if (w.untyped_storage().data_ptr() != storage or w.storage_offset() != offset or not w.is_contiguous()
                or w.dtype != w0.dtype or w.shape[1] != w0.shape[1]):
            return None
        offset += w.numel()
    return w0.as_strided((sum(lin.weight.shape[0] for lin in linears), w0.shape[1]), (w0.shape[1], 1),
                         w0.storage_offset())


class Attention(nn.Module):
    def __init__(self, config: KeyeConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.topk = c.index_topk
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=c.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=c.rms_norm_eps)
        self.sa_indexer = Indexer(c)

    def input_projections(self) -> tuple[nn.Linear, ...]:
        """The linears that read the layer input, in packing order: q, k, v, then the indexer's q and k."""
        return self.q_proj, self.k_proj, self.v_proj, self.sa_indexer.q_proj, self.sa_indexer.k_proj

    def pack_input_projections(self) -> None:
        """Copy the five input projections' weights into one buffer and make them views of it, so inference reads
        them with one GEMM (decode on the H200: 35 -> 10 us per layer; NOTES.md). Values, names, the state_dict
        and the Parameter objects are unchanged (only their storage moves: an optimizer holding them keeps
        updating the model); idempotent. Training (gradients wanted) keeps one GEMM per linear."""
        linears = self.input_projections()
        if not _plain_weights(linears) or _packed_weight(linears) is not None:
            return
        packed = torch.cat([lin.weight.detach() for lin in linears])
        row = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight.data = packed[row: row + n]
            row += n

    def _project(self, x: torch.Tensor, need_index: bool) -> list[torch.Tensor]:
        linears = self.input_projections()[: 5 if need_index else 3]
        grad = torch.is_grad_enabled() and any(lin.weight.requires_grad for lin in linears)
        packed = None if grad else _packed_weight(linears)  # a prefix of the packed rows serves q, k, v alone
        if packed is None:
            return [lin(x) for lin in linears]
        return list(F.linear(x, packed).split([lin.weight.shape[0] for lin in linears], dim=-1))

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        T = x.shape[0]
        sparse = ctx.mode == "sparse" or (ctx.mode == "auto" and ctx.max_len > self.topk)
        # With a cache the index keys are needed even on the dense path (later steps may be sparse).
        need_index = sparse or (ctx.cache is not None and ctx.mode != "dense")
        q, k, v, *index_proj = self._project(x, need_index)
        q = keye.ops.rms_norm_rope(q.view(T, self.heads, self.head_dim), self.q_norm.weight, ctx.cos, ctx.sin,
                                   self.q_norm.eps)
        k = keye.ops.rms_norm_rope(k.view(T, self.kv_heads, self.head_dim), self.k_norm.weight, ctx.cos, ctx.sin,
                                   self.k_norm.eps)
        v = v.view(T, self.kv_heads, self.head_dim)
        index = self.sa_indexer.from_projections(*index_proj, ctx.index_cos, ctx.index_sin) if need_index else None
        if ctx.cache is None:
            o = self._sparse(q, k, v, index, ctx) if sparse else self._dense(q, k, v, ctx)
        else:
            o = self._cached(q, k, v, index, sparse, ctx)
        return self.o_proj(o.reshape(T, -1))

    # -- without a cache: packed whole sequences
    def select(self, index, ctx: AttentionContext) -> torch.Tensor:
        """Top-k positions [T, topk] (within each sequence, ascending, -1 empty) from the indexer outputs."""
        q8, q_scale, w, k8, k_scale = index
        return keye.ops.indexer_topk_prefill(q8, q_scale, w, k8, k_scale, ctx.cu_seqlens, self.topk)

    def _sparse(self, q, k, v, index, ctx):
        return keye.ops.sparse_attention(q, k, v, self.select(index, ctx), ctx.cu_seqlens)[0]

    def _dense(self, q, k, v, ctx):
        out = []
        for a, b in zip(ctx.seq_bounds[:-1], ctx.seq_bounds[1:]):
            qs, ks, vs = (z[a:b].transpose(0, 1).unsqueeze(0) for z in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            out.append(o.squeeze(0).transpose(0, 1))
        return torch.cat(out)

    # -- through the paged cache: n new tokens per sequence
    def _cached_sparse(self, q, index, ctx):
        """Top-k from the paged index cache, then sparse attention over the paged K/V. A long prefill chunk is
        cut into query blocks whose fp32 score rows [block, context] stay within SCORE_BYTES: block [a, b) is
        selected as if the sequences ended at b (its queries see no later key anyway)."""
        cache, step, L = ctx.cache, ctx.step, self.layer_idx
        B, n = len(step.seq_ids), step.n
        q8, q_scale, w, _, _ = index
        q8, q_scale, w = q8.view(B, n, *q8.shape[1:]), q_scale.view(B, n, -1), w.view(B, n, -1)
        q = q.view(B, n, self.heads, self.head_dim)
        block = max(1, SCORE_BYTES // (4 * B * step.block_table.shape[1] * PAGE_SIZE))
        out = []
        for a in range(0, n, block):
            b = min(a + block, n)
            seq_lens = step.seq_lens if b == n else step.seq_lens - (n - b)  # (no kernel for the usual one block)
            slots = keye.ops.indexer_topk_decode(q8[:, a:b], q_scale[:, a:b], w[:, a:b], cache.index_k[L],
                                                 cache.index_scale[L], step.block_table, seq_lens, self.topk,
                                                 physical=True)
            out.append(keye.ops.sparse_attention_decode(q[:, a:b], cache.k[L], cache.v[L], slots)[0])
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def _cached(self, q, k, v, index, sparse, ctx):
        cache, step, L = ctx.cache, ctx.step, self.layer_idx
        k_cache, v_cache = cache.k[L], cache.v[L]
        k_cache.view(-1, self.kv_heads, self.head_dim)[step.slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, self.kv_heads, self.head_dim)[step.slot_mapping] = v.to(v_cache.dtype)
        B, n = len(step.seq_ids), step.n
        if index is not None:
            if not cache.with_index:
                raise ValueError("keye.model.attention: the cache was built with_index=False but the attention mode "
                                 f"is {ctx.mode!r}; use mode 'dense' or a cache with the index")
            q8, q_scale, w, k8, k_scale = index
            keye.ops.indexer_cache_append(k8, k_scale, cache.index_k[L], cache.index_scale[L], step.slot_mapping)
        if sparse:
            return self._cached_sparse(q, index, ctx).reshape(B * n, self.heads, self.head_dim)
        out = []
        for b in range(B):
            Lb = step.context_lens[b] + n
            pages = step.block_table[b, : -(-Lb // PAGE_SIZE)].long()
            ks, vs = (c[pages].reshape(-1, self.kv_heads, self.head_dim)[:Lb].transpose(0, 1).unsqueeze(0)
                      for c in (k_cache, v_cache))
            qs = q[b * n:(b + 1) * n].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks.to(qs.dtype), vs.to(qs.dtype),
                                               attn_mask=causal_lower_right(n, Lb), enable_gqa=True)
            out.append(o.squeeze(0).transpose(0, 1))
        return torch.cat(out)


__all__ = ["Attention", "Indexer", "AttentionContext", "MODES"]
