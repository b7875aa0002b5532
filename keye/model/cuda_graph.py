"""Decode steps replayed from CUDA graphs: one graph per batch size, captured on first use.

Eager decode of the 48-layer model launches thousands of small kernels per token and is bound by the host
(~6-8 tokens/s at batch 1 on the H200). A captured step replays them in one go. The graph always takes the
sparse path (indexer top-k + sparse attention over the paged caches): while a context is no longer than top-k,
top-k selects every earlier position, so this equals the dense fast path. The block table is captured at its
widest (every page of the cache) so a graph serves every context length.

The first step of a batch size is run eagerly once (warm-up, which writes its K/V and index keys) and then
recorded (recording executes nothing); the replay writes the same values again, so capturing on a real step is
harmless.
"""

from __future__ import annotations

import torch

import keye.ops
from keye.model.cache import CacheStep, PagedKVCache
from keye.model.keye_vl import KeyeVL


class GraphedDecoder:
    """decoder(step, token_ids [B], position_ids [3, B]) -> logits fp32 [B, vocab] for a one-token CacheStep."""

    def __init__(self, model: KeyeVL, cache: PagedKVCache):
        if cache.device.type != "cuda":
            raise ValueError("keye.GraphedDecoder: CUDA graphs need a cache on a CUDA device, got "
                             f"{cache.device}")
        if not cache.with_index:
            raise ValueError("keye.GraphedDecoder: the graph takes the sparse path and needs the index cache")
        self.model, self.cache = model.pack_input_projections(), cache
        self.graphs: dict[int, tuple] = {}

    def _buffers(self, B: int):
        dev = self.cache.device
        return dict(ids=torch.zeros(B, dtype=torch.long, device=dev),
                    pos=torch.zeros(3, B, dtype=torch.long, device=dev),
                    table=torch.zeros(B, self.cache.num_pages, dtype=torch.int32, device=dev),
                    seq_lens=torch.ones(B, dtype=torch.int32, device=dev),
                    slots=torch.zeros(B, dtype=torch.int64, device=dev))

    def _fill(self, buf, step: CacheStep, ids, pos) -> None:
        buf["ids"].copy_(ids)
        buf["pos"].copy_(pos)
        buf["table"].zero_()
        buf["table"][:, : step.block_table.shape[1]].copy_(step.block_table)
        buf["seq_lens"].copy_(step.seq_lens)
        buf["slots"].copy_(step.slot_mapping)

    def _run(self, buf, B: int):
        step = CacheStep(list(range(B)), 1, [0] * B, buf["table"], buf["seq_lens"], buf["slots"])
        embeds = self.model.model.embed_tokens(buf["ids"])
        return self.model(inputs_embeds=embeds, position_ids=buf["pos"], cache=self.cache, step=step,
                          logits="last", attention_mode="sparse")

    @torch.no_grad()
    def __call__(self, step: CacheStep, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B = len(step.seq_ids)
        if step.n != 1 or tuple(ids.shape) != (B,) or tuple(pos.shape) != (3, B):
            raise ValueError(f"keye.GraphedDecoder: expects one new token per sequence (ids [{B}], position_ids "
                             f"[3, {B}]), got n={step.n}, {list(ids.shape)}, {list(pos.shape)}")
        if B not in self.graphs:
            buf = self._buffers(B)
            self._fill(buf, step, ids, pos)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), keye.ops.index_checks(False):
                self._run(buf, B)  # warm-up: lazy inits, allocator pools
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), keye.ops.index_checks(False):
                out = self._run(buf, B)
            self.graphs[B] = (graph, buf, out)
        graph, buf, out = self.graphs[B]
        self._fill(buf, step, ids, pos)
        graph.replay()
        return out.clone()


__all__ = ["GraphedDecoder"]
