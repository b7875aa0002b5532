"""Generation: chunked prefill per request, then batched decode of all live requests through the paged caches.

    results = generate(model, [GenerationRequest(ids, max_new_tokens=64), ...], stream=print)

Each request's prompt (with its images / video frames encoded once) is prefilled in chunks of `prefill_chunk`
tokens; decode then takes one token per live request per step, requests of any lengths together. Sampling per
request: greedy (temperature 0) or temperature + top-p with the request's own seeded generator, so a request
gives the same tokens alone or in a batch. Generation stops at a stop token (not included in the output) or
after max_new_tokens. Decode positions continue from the prompt's largest M-RoPE position + 1 (all rows equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from keye.model.cache import PagedKVCache
from keye.model.cuda_graph import GraphedDecoder
from keye.model.keye_vl import KeyeVL

OP = "keye.generate"


@dataclass
class GenerationRequest:
    input_ids: Sequence[int] | torch.Tensor
    max_new_tokens: int = 256
    temperature: float = 0.0                  # 0 = greedy
    top_p: float = 1.0
    stop_token_ids: Sequence[int] | None = None   # None = the config's eos_token_ids
    seed: int = 0
    position_ids: torch.Tensor | None = None  # [3, L] from keye.processor; None = text positions
    vision: dict = field(default_factory=dict)  # pixel_values / image_grid_thw / pixel_values_videos / video_grid_thw


@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: str                        # "stop" or "length"


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from logits [V]: argmax (lowest id on ties) when temperature == 0, else from
    softmax(logits / temperature) restricted to the smallest set of top tokens whose mass reaches top_p."""
    logits = logits.float()
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p, order = torch.sort(probs, descending=True, stable=True)
        keep = (p.cumsum(0) - p) < top_p  # a token stays if the mass before it is below top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _sample_rows(logits: torch.Tensor, requests: list[GenerationRequest], gens: list[torch.Generator]) -> list[int]:
    """One token per row of logits [B, V]: the greedy rows' argmaxes in one kernel and one device-to-host copy
    (instead of a cast, an argmax and a sync per row), the sampled rows one by one with their own generators (so a
    request draws the same tokens alone or in a batch)."""
    greedy = [row for row, r in enumerate(requests) if r.temperature == 0]
    picks = {}
    if greedy:
        rows = logits if len(greedy) == len(requests) else logits[greedy]
        picks = dict(zip(greedy, rows.float().argmax(-1).tolist()))  # argmax: lowest id on ties, as sample()
    return [picks[row] if row in picks else sample(logits[row], r.temperature, r.top_p, gen)
            for row, (r, gen) in enumerate(zip(requests, gens))]


def _check_request(i: int, r: GenerationRequest, vocab: int) -> torch.Tensor:
    def fail(msg):
        raise ValueError(f"{OP}: request {i}: {msg}")
    if not isinstance(r, GenerationRequest):
        fail(f"must be a GenerationRequest, got {type(r).__name__}")
    ids = torch.as_tensor(r.input_ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        fail(f"'input_ids' must be a non-empty 1-D sequence of ints, got shape {list(ids.shape)} {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        fail(f"'input_ids' must hold values in [0, {vocab - 1}], found [{int(ids.min())}, {int(ids.max())}]")
    if not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1:
        fail(f"'max_new_tokens' must be an int >= 1, got {r.max_new_tokens!r}")
    if not (isinstance(r.temperature, (int, float)) and r.temperature >= 0):
        fail(f"'temperature' must be a number >= 0, got {r.temperature!r}")
    if not (isinstance(r.top_p, (int, float)) and 0 < r.top_p <= 1):
        fail(f"'top_p' must be in (0, 1], got {r.top_p!r}")
    if r.position_ids is not None and (not isinstance(r.position_ids, torch.Tensor)
                                       or tuple(r.position_ids.shape) != (3, ids.numel())):
        fail(f"'position_ids' must be a tensor [3, {ids.numel()}], got "
             f"{getattr(r.position_ids, 'shape', r.position_ids)!r}")
    if r.vision and r.position_ids is None:
        fail("'position_ids' [3, L] are required with images / videos (see keye.processor)")
    return ids.long()


@torch.no_grad()
def generate(model: KeyeVL, requests: Sequence[GenerationRequest], *, cache: PagedKVCache | None = None,
             prefill_chunk: int = 8192, stream: Callable[[int, int], None] | None = None,
             cuda_graphs: bool = False) -> list[GenerationResult]:
    """Generate for every request; stream(request_index, token) is called for each output token as it is
    produced. With cache=None a cache exactly large enough for all requests is made; a given cache must
    have room for them (CacheFullError otherwise). Sequences are released from the cache at the end.
    cuda_graphs=True replays decode steps from CUDA graphs (GraphedDecoder; CUDA, attention mode not dense)."""
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"{OP}: 'prefill_chunk' must be a positive int, got {prefill_chunk!r}")
    if cuda_graphs and (not next(model.parameters()).is_cuda or model.attention_mode == "dense"):
        raise ValueError(f"{OP}: cuda_graphs=True needs the model on a CUDA device and an attention mode other "
                         f"than 'dense' (the graph takes the sparse path), got {next(model.parameters()).device}, "
                         f"{model.attention_mode!r}")
    if not requests:
        return []
    cfg = model.config
    model.pack_input_projections()  # one GEMM per layer for q, k, v and the indexer's inputs
    ids_list = [_check_request(i, r, cfg.vocab_size) for i, r in enumerate(requests)]
    param = next(model.parameters())
    dev = param.device
    if cache is None:
        cache = PagedKVCache.for_tokens(cfg, [len(x) + r.max_new_tokens for x, r in zip(ids_list, requests)],
                                        dtype=param.dtype, device=dev,
                                        with_index=model.attention_mode != "dense")
    decoder = GraphedDecoder(model, cache) if cuda_graphs else None
    seqs = [cache.new_sequence() for _ in requests]
    gens = [torch.Generator(device=dev).manual_seed(r.seed) for r in requests]
    stops = [set(cfg.eos_token_ids if r.stop_token_ids is None else r.stop_token_ids) for r in requests]
    results = [GenerationResult([], "length") for _ in requests]
    next_pos, pending = [], []
    try:
        for i, (r, ids) in enumerate(zip(requests, ids_list)):
            ids = ids.to(dev)
            pos = r.position_ids.to(dev) if r.position_ids is not None else torch.arange(len(ids), device=dev
                                                                                          ).expand(3, -1)
            embeds = model.embed(ids, **r.vision)
            for a in range(0, len(ids), prefill_chunk):
                b = min(a + prefill_chunk, len(ids))
                step = cache.prepare([seqs[i]], b - a)
                out = model(inputs_embeds=embeds[a:b], position_ids=pos[:, a:b], cache=cache, step=step,
                            logits="last" if b == len(ids) else None)
            next_pos.append(int(pos.max()) + 1)
            pending.append(sample(out[0], r.temperature, r.top_p, gens[i]))
        live = list(range(len(requests)))
        while live:
            still = []
            for i in live:  # take the token sampled last step; stop or feed it back
                tok = pending[i]
                if tok in stops[i]:
                    results[i].finish_reason = "stop"
                    continue
                results[i].tokens.append(tok)
                if stream is not None:
                    stream(i, tok)
                if len(results[i].tokens) < requests[i].max_new_tokens:
                    still.append(i)
            live = still
            if not live:
                break
            step = cache.prepare([seqs[i] for i in live], 1)
            ids = torch.tensor([pending[i] for i in live], device=dev)
            pos = torch.tensor([next_pos[i] for i in live], device=dev).expand(3, -1)
            if decoder is not None:
                logits = decoder(step, ids, pos)
            else:  # plain token embeddings: a generated <|image_pad|> id is text here, not a vision placeholder
                logits = model(inputs_embeds=model.model.embed_tokens(ids), position_ids=pos, cache=cache,
                               step=step, logits="last")
            for i, tok in zip(live, _sample_rows(logits, [requests[i] for i in live], [gens[i] for i in live])):
                next_pos[i] += 1
                pending[i] = tok
    finally:
        for s in seqs:
            cache.release(s)
    return results


__all__ = ["GenerationRequest", "GenerationResult", "generate", "sample"]
