"""Paged caches for serving: the bf16 K/V cache of every layer and the FP8 index-key cache of the DSA indexer,
sharing one page table (page size 64, the index cache's fixed page), plus the memory plan for one GPU.

A sequence owns a list of pages; token p of it lives in slot ``page[p // 64] * 64 + p % 64`` of every layer's
caches. ``PagedKVCache.prepare(seq_ids, n)`` reserves room for n new tokens per sequence and returns the
``CacheStep`` (block table, slots, lengths) the model's forward writes and reads through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from keye.model.config import KeyeConfig
from keye.ops.reference.dsa_indexer import FP8, PAGE_SIZE


class CacheFullError(RuntimeError):
    """No free pages left for the requested tokens."""


@dataclass
class CacheStep:
    """One forward step through the cache: n new tokens for each of B sequences (packed b-major)."""
    seq_ids: list[int]
    n: int                       # new tokens per sequence
    context_lens: list[int]      # tokens cached before this step
    block_table: torch.Tensor    # int32 [B, max_pages]
    seq_lens: torch.Tensor       # int32 [B] = context_lens + n
    slot_mapping: torch.Tensor   # int64 [B * n]: the cache slot of each new token

    @property
    def max_seq_len(self) -> int:
        return max(self.context_lens) + self.n


class PagedKVCache:
    """Per layer: k, v [num_pages, 64, Hkv, D] (model dtype) and the indexer's k8 [num_pages, 64, D_I] fp8 with
    k_scale [num_pages, 64] fp32 (with_index=False leaves the index cache out, for dense-only serving)."""

    def __init__(self, config: KeyeConfig, num_pages: int, *, dtype=torch.bfloat16, device="cpu",
                 with_index: bool = True):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"keye.PagedKVCache: 'num_pages' must be a positive int, got {num_pages!r}")
        c = config
        shape = (num_pages, PAGE_SIZE, c.num_key_value_heads, c.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.with_index = with_index
        if with_index:
            self.index_k = [torch.zeros(num_pages, PAGE_SIZE, c.indexer_head_dim, dtype=FP8, device=device)
                            for _ in range(c.num_hidden_layers)]
            self.index_scale = [torch.zeros(num_pages, PAGE_SIZE, dtype=torch.float32, device=device)
                                for _ in range(c.num_hidden_layers)]
        self.num_pages = num_pages
        self.device = torch.device(device)
        self._free = list(range(num_pages - 1, -1, -1))
        self._pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._next_id = 0

    @classmethod
    def for_tokens(cls, config: KeyeConfig, token_counts: list[int], **kw) -> "PagedKVCache":
        """A cache with exactly enough pages for sequences of these lengths."""
        return cls(config, max(1, sum(math.ceil(n / PAGE_SIZE) for n in token_counts)), **kw)

    # ---- sequences ---------------------------------------------------------------------------------------

    def new_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self._pages[sid], self._lens[sid] = [], 0
        return sid

    def release(self, seq_id: int) -> None:
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self._lens[seq_id]

    def seq_len(self, seq_id: int) -> int:
        return self._lens[seq_id]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def prepare(self, seq_ids: list[int], n: int) -> CacheStep:
        """Reserve n new tokens for each sequence (their lengths grow by n) and describe the step."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"keye.PagedKVCache.prepare: 'n' must be a positive int, got {n!r}")
        unknown = [s for s in seq_ids if s not in self._pages]
        if unknown or not seq_ids or len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"keye.PagedKVCache.prepare: 'seq_ids' must be distinct live sequences, got {seq_ids}")
        need = sum(max(0, math.ceil((self._lens[s] + n) / PAGE_SIZE) - len(self._pages[s])) for s in seq_ids)
        if need > len(self._free):
            raise CacheFullError(f"keye.PagedKVCache.prepare: {need} more pages needed for {n} tokens x "
                                 f"{len(seq_ids)} sequences, {len(self._free)} free of {self.num_pages}")
        context = [self._lens[s] for s in seq_ids]
        for s in seq_ids:
            pages = self._pages[s]
            while len(pages) * PAGE_SIZE < self._lens[s] + n:
                pages.append(self._free.pop())
            self._lens[s] += n
        width = max(len(self._pages[s]) for s in seq_ids)
        table = torch.zeros(len(seq_ids), width, dtype=torch.int32)
        slots = torch.empty(len(seq_ids), n, dtype=torch.int64)
        for b, s in enumerate(seq_ids):
            pages = torch.tensor(self._pages[s], dtype=torch.int64)
            table[b, : len(pages)] = pages.int()
            pos = torch.arange(context[b], context[b] + n)
            slots[b] = pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE
        return CacheStep(list(seq_ids), n, context, table.to(self.device),
                         torch.tensor([c + n for c in context], dtype=torch.int32, device=self.device),
                         slots.view(-1).to(self.device))


# ---- memory plan ------------------------------------------------------------------------------------------

H200_BYTES = 141 * 10 ** 9


def parameter_count(config: KeyeConfig) -> int:
    """Parameters of the whole model (ViT with packing embedding, mlp_AR, LM with indexers, lm_head)."""
    v, c = config.vision_config, config
    D, P = v.hidden_size, v.patch_size
    vit_layer = 4 * (D * D + D) + 2 * 2 * D + (D * v.intermediate_size + v.intermediate_size) \
        + (v.intermediate_size * D + D)
    vit = (D * v.num_channels * P * P + D) + v.position_grid ** 2 * D + v.num_packing_positions * D \
        + v.num_hidden_layers * vit_layer + 2 * D
    m = D * v.spatial_merge_size ** 2
    projector = 2 * m + (m * m + m) + (m * c.hidden_size + c.hidden_size)
    H, Hd = c.hidden_size, c.head_dim
    attn = H * Hd * (c.num_attention_heads + 2 * c.num_key_value_heads) + c.num_attention_heads * Hd * H + 2 * Hd
    Hi, Di = c.indexer_num_heads, c.indexer_head_dim
    indexer = H * (Hi * Di + Hi) + H * Di + Di + 2 * Di
    moe = H * c.num_experts + c.num_experts * 3 * H * c.moe_intermediate_size
    lm = c.vocab_size * H + c.num_hidden_layers * (2 * H + attn + indexer + moe) + H
    head = 0 if c.tie_word_embeddings else c.vocab_size * H
    return vit + projector + lm + head


def kv_bytes_per_token(config: KeyeConfig, dtype_bytes: int = 2) -> int:
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes


def index_bytes_per_token(config: KeyeConfig) -> int:
    return config.num_hidden_layers * (config.indexer_head_dim + 4)  # fp8 key + fp32 scale


def prefill_activation_bytes(config: KeyeConfig, chunk: int, dtype_bytes: int = 2,
                             indexer_score_bytes: int = 1 << 30) -> int:
    """Peak transient memory of one prefill chunk of `chunk` tokens through one layer (activations are freed
    layer by layer), doubled for allocator fragmentation:
    residual + normed hidden, q/k/v/attention-out (+ fp32 rope copies of q and k), the indexer's q/w
    (bf16, fp32, fp8) and its chunked fp32 score buffer, the top-k indices (int32) and slots (int64), the
    MoE's permuted rows (x, gate_up, activation, down output at top-k rows each) and fp32 router logits."""
    c, b = config, dtype_bytes
    H, Hd = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * Hd, c.num_key_value_heads * Hd
    iq = c.indexer_num_heads * (c.indexer_head_dim + 1)
    per_token = (2 * H * b + (2 * q + 2 * kv) * b + (q + kv) * 4
                 + iq * (b + 4 + 1) + c.index_topk * (4 + 8)
                 + c.num_experts_per_tok * (2 * H + 3 * c.moe_intermediate_size) * b + c.num_experts * 4)
    return 2 * (chunk * per_token + indexer_score_bytes)


@dataclass
class MemoryPlan:
    device_bytes: int
    weight_bytes: int
    kv_bytes_per_token: int
    index_bytes_per_token: int
    context_tokens: int           # total cached tokens over all sequences
    cache_pages: int
    cache_bytes: int
    activation_bytes: int
    reserve_bytes: int            # CUDA context, cuBLAS workspaces, logits
    total_bytes: int
    fits: bool
    max_context_tokens: int       # cache tokens that fit next to the weights and activations

    def summary(self) -> str:
        g = 1e9
        return (f"weights {self.weight_bytes / g:.2f} GB + cache {self.cache_bytes / g:.2f} GB "
                f"({self.context_tokens} tokens x {self.kv_bytes_per_token + self.index_bytes_per_token} B) + "
                f"activations {self.activation_bytes / g:.2f} GB + reserve {self.reserve_bytes / g:.2f} GB = "
                f"{self.total_bytes / g:.2f} GB of {self.device_bytes / g:.2f} GB "
                f"({'fits' if self.fits else 'does NOT fit'}; max {self.max_context_tokens} tokens)")


def plan_memory(config: KeyeConfig, context_tokens: int, *, num_sequences: int = 1,
                device_bytes: int = H200_BYTES, prefill_chunk: int = 8192, dtype_bytes: int = 2,
                reserve_bytes: int = 3 * 10 ** 9) -> MemoryPlan:
    """Memory for the full model in `dtype_bytes` weights plus a paged cache of `context_tokens` tokens spread
    over `num_sequences` sequences (each rounds up to whole pages) while prefilling in chunks of
    `prefill_chunk` tokens."""
    if context_tokens < 0 or num_sequences < 1 or prefill_chunk < 1:
        raise ValueError(f"keye.plan_memory: need context_tokens >= 0, num_sequences >= 1, prefill_chunk >= 1; got "
                         f"{context_tokens}, {num_sequences}, {prefill_chunk}")
    weights = parameter_count(config) * dtype_bytes
    kv, idx = kv_bytes_per_token(config, dtype_bytes), index_bytes_per_token(config)
    per_seq = math.ceil(context_tokens / num_sequences)
    pages = num_sequences * math.ceil(per_seq / PAGE_SIZE)
    cache = pages * PAGE_SIZE * (kv + idx)
    act = prefill_activation_bytes(config, prefill_chunk, dtype_bytes)
    reserve = reserve_bytes + num_sequences * config.vocab_size * 4 * 2  # fp32 logits + sampling copy
    total = weights + cache + act + reserve
    spare = device_bytes - weights - act - reserve
    max_tokens = max(0, spare // (PAGE_SIZE * (kv + idx)) * PAGE_SIZE)
    return MemoryPlan(device_bytes, weights, kv, idx, context_tokens, pages, cache, act, reserve, total,
                      total <= device_bytes, int(max_tokens))


__all__ = ["CacheStep", "PagedKVCache", "CacheFullError", "parameter_count", "kv_bytes_per_token",
           "index_bytes_per_token", "prefill_activation_bytes", "MemoryPlan", "plan_memory", "H200_BYTES"]
