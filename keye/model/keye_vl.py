"""The whole Keye-VL-2.0 model: ``visual`` (ViT) -> ``mlp_AR`` (projector) -> ``model`` (MoE-DSA LM) -> ``lm_head``.

    model = KeyeVL(config)
    logits = model(input_ids, position_ids, pixel_values=..., image_grid_thw=...)      # packed [T] tokens

Token rows are packed: one sequence, or several with ``cu_seqlens`` [B + 1]; or, through a paged cache,
n new tokens for each sequence of a ``CacheStep``. ``position_ids`` [3, T] are the M-RoPE (t, h, w) ids that
keye.processor computes; without them every sequence gets text positions (all three rows = arange, counting on
from the cached context). Vision features replace the embeddings of the <|image_pad|> / <|video_pad|> tokens
in order, one per 2 x 2 merged patch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from keye.model.attention import MODES
from keye.model.cache import CacheStep, PagedKVCache
from keye.model.config import KeyeConfig
from keye.model.language import LanguageModel
from keye.model.projector import Projector
from keye.model.vision import Visual
from keye.processor.positions import check_grid_thw

OP = "keye.KeyeVL"


def _fail(msg: str):
    raise ValueError(f"{OP}: {msg}")


def check_cu_seqlens(cu_seqlens, total: int, device) -> torch.Tensor:
    if cu_seqlens is None:
        return torch.tensor([0, total], dtype=torch.int32, device=device)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        _fail(f"'cu_seqlens' must be a 1-D integer tensor [B + 1], got {cu_seqlens!r}")
    b = cu_seqlens.tolist()
    if len(b) < 2 or b[0] != 0 or b[-1] != total or any(y <= x for x, y in zip(b[:-1], b[1:])):
        _fail(f"'cu_seqlens' must start at 0, strictly increase (no empty sequence) and end at the token count "
              f"{total}, got {b[:8]}{'...' if len(b) > 8 else ''}")
    return cu_seqlens.to(device=device, dtype=torch.int32)


class KeyeVL(nn.Module):
    def __init__(self, config: KeyeConfig, attention_mode: str = "auto"):
        super().__init__()
        self.config = config
        vc = config.vision_config
        self.visual = Visual(vc)
        self.mlp_AR = Projector(vc.hidden_size, config.hidden_size, vc.spatial_merge_size,
                                config.projector_layer_norm_eps)
        self.model = LanguageModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.attention_mode = attention_mode

    @property
    def attention_mode(self) -> str:
        return self._attention_mode

    @attention_mode.setter
    def attention_mode(self, mode: str) -> None:
        if mode not in MODES:
            _fail(f"'attention_mode' must be one of {MODES}, got {mode!r}")
        self._attention_mode = mode

    def pack_input_projections(self) -> "KeyeVL":
        """Per decoder layer, one buffer for the attention's five input projections (q, k, v, indexer q and k), so
        inference runs one GEMM instead of five (Attention.pack_input_projections). load_checkpoint, generate and
        GraphedDecoder call it; values and the state_dict are unchanged."""
        for layer in self.model.layers:
            layer.self_attn.pack_input_projections()
        return self

    def pack_experts(self) -> "KeyeVL":
        """For inference: every MoE layer's gate_up in keye.ops.moe_pack_gate_up's column order (Experts.pack: SwiGLU
        in the gate_up GEMM's epilogue). The state_dict and save_checkpoint keep the checkpoint's order; computing
        gradients needs unpack_experts() first. Idempotent."""
        for layer in self.model.layers:
            layer.mlp.experts.pack()
        return self

    def unpack_experts(self) -> "KeyeVL":
        """Undo pack_experts (gate_up back in the checkpoint's column order). Idempotent."""
        for layer in self.model.layers:
            layer.mlp.experts.unpack()
        return self

    # ---- embeddings -------------------------------------------------------------------------------------------

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, chunk_patches: int = 8192
                      ) -> torch.Tensor:
        """Pixel patches [N, C, P, P] of images / frames with grid_thw [G, 3] -> LM tokens [N / 4, hidden].

        Frames never attend to each other, so the ViT runs on groups of whole frames of about chunk_patches
        patches at a time (sglang's KEYE_VIDEO_PATCH_CHUNK_SIZE): same result, bounded activations."""
        grids = check_grid_thw(grid_thw, "grid_thw", self.config.vision_config.spatial_merge_size, "keye.model")
        frames = [(h, w) for t, h, w in grids for _ in range(t)]
        n = sum(h * w for h, w in frames)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[0] != n:
            _fail(f"the pixel values must be [N, C, P, P] with N = {n} patches (grid_thw "
                  f"{[list(g) for g in grids]}), got {getattr(pixel_values, 'shape', pixel_values)!r}")
        if not frames:  # e.g. the processor's empty pixel_values [0, C, P, P] with grid_thw [0, 3]
            return self.lm_head.weight.new_zeros(0, self.config.hidden_size)
        groups, cur = [], []
        for h, w in frames:
            if cur and sum(a * b for a, b in cur) + h * w > chunk_patches:
                groups.append(cur)
                cur = []
            cur.append((h, w))
        groups.append(cur)
        out, start = [], 0
        for group in groups:
            size = sum(h * w for h, w in group)
            g = []  # runs of equal frame sizes as (t, h, w): one batched attention call per run
            for h, w in group:
                if g and g[-1][1:] == (h, w):
                    g[-1] = (g[-1][0] + 1, h, w)
                else:
                    g.append((1, h, w))
            feats = self.visual(pixel_values[start:start + size], torch.tensor(g))
            out.append(self.mlp_AR(feats, g))
            start += size
        return torch.cat(out)

    def embed(self, input_ids: torch.Tensor, *, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None) -> torch.Tensor:
        """Token embeddings [T, hidden] with the vision features written over the placeholder tokens."""
        c = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.dtype.is_floating_point \
                or input_ids.dtype == torch.bool:
            _fail(f"'input_ids' must be a 1-D integer tensor [T], got {getattr(input_ids, 'shape', input_ids)!r}")
        if input_ids.numel() == 0:
            _fail("'input_ids' is empty")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= c.vocab_size:
            _fail(f"'input_ids' must hold values in [0, {c.vocab_size - 1}], found [{lo}, {hi}]")
        emb = self.model.embed_tokens(input_ids)
        for pixels, grid, token, what in ((pixel_values, image_grid_thw, c.image_token_id, "image"),
                                          (pixel_values_videos, video_grid_thw, c.video_token_id, "video")):
            mask = input_ids == token
            count = int(mask.sum())
            if pixels is None:
                if grid is not None:
                    _fail(f"{what}_grid_thw given without its pixel values")
                if count:
                    _fail(f"'input_ids' hold {count} <|{what}_pad|> tokens (id {token}) but no {what} pixel values "
                          "were given")
                continue
            if grid is None:
                _fail(f"{what} pixel values given without {what}_grid_thw")
            feats = self.encode_vision(pixels, grid)
            if feats.shape[0] != count:
                _fail(f"'input_ids' hold {count} <|{what}_pad|> tokens (id {token}) but the {what}s give "
                      f"{feats.shape[0]} features (t*h*w/4 summed over {what}_grid_thw)")
            emb = emb.masked_scatter(mask.unsqueeze(-1), feats.to(emb.dtype))
        return emb

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                cache: PagedKVCache | None = None, step: CacheStep | None = None, logits: str | None = "all",
                attention_mode: str | None = None, **vision) -> torch.Tensor:
        """Logits fp32 [T, vocab] ("all"), [B, vocab] of each sequence's last row ("last"), or the final hidden
        states [T, hidden] (logits=None)."""
        if (input_ids is None) == (inputs_embeds is None):
            _fail("give exactly one of 'input_ids' and 'inputs_embeds'")
        if inputs_embeds is None:
            hidden = self.embed(input_ids, **vision)
        else:
            if vision:
                _fail("vision inputs go with 'input_ids' (they are merged into the embeddings by embed())")
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 2 \
                    or inputs_embeds.shape[1] != self.config.hidden_size:
                _fail(f"'inputs_embeds' must be [T, {self.config.hidden_size}], got "
                      f"{getattr(inputs_embeds, 'shape', inputs_embeds)!r}")
            hidden = inputs_embeds
        T, dev = hidden.shape[0], hidden.device
        mode = self.attention_mode if attention_mode is None else attention_mode
        if mode not in MODES:
            _fail(f"'attention_mode' must be one of {MODES}, got {mode!r}")
        if logits not in ("all", "last", None):
            _fail(f"'logits' must be 'all', 'last' or None, got {logits!r}")
        if (cache is None) != (step is None):
            _fail("'cache' and 'step' go together (step = cache.prepare(seq_ids, n))")
        if cache is None:
            cu_seqlens = check_cu_seqlens(cu_seqlens, T, dev)
            bounds = cu_seqlens.tolist()
            last = cu_seqlens[1:].long() - 1
            if position_ids is None:
                text = torch.cat([torch.arange(b - a, device=dev) for a, b in zip(bounds[:-1], bounds[1:])])
        else:
            if cu_seqlens is not None:
                _fail("'cu_seqlens' is for the uncached path; a cached step has n tokens per sequence")
            B, n = len(step.seq_ids), step.n
            if T != B * n:
                _fail(f"the step has {B} sequences x {n} new tokens = {B * n} rows but {T} were given")
            last = torch.arange(B, device=dev) * n + n - 1
            if position_ids is None:
                text = torch.cat([torch.arange(c, c + n, device=dev) for c in step.context_lens])
        if position_ids is None:
            if vision:
                _fail("'position_ids' [3, T] are required with images / videos (see keye.processor)")
            position_ids = text.unsqueeze(0).expand(3, T)
        elif not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape) != (3, T) \
                or position_ids.dtype.is_floating_point:
            _fail(f"'position_ids' must be an integer tensor [3, {T}], got "
                  f"{getattr(position_ids, 'shape', position_ids)!r}")
        ctx = self.model.context(position_ids.to(dev), mode, cu_seqlens, cache, step)
        hidden = self.model(hidden, ctx)
        if logits is None:
            return hidden
        if logits == "last":
            hidden = hidden[last]
        return self.lm_head(hidden).float()


__all__ = ["KeyeVL"]
