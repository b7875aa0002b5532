"""Generation with the paged caches (tiny random model, CPU) and the memory plan of the full model on one H200."""

import pytest
import torch

from keye.model import (CacheFullError, GenerationRequest, KeyeVL, PagedKVCache, generate, keye_vl_2_30b_a3b,
                        plan_memory, sample, tiny_config)
from keye.model.cache import index_bytes_per_token, kv_bytes_per_token

import test_model_modules

one_thread = test_model_modules.one_thread  # fixtures shared with the module tests
row_wise_linear = test_model_modules.row_wise_linear


@pytest.fixture
def model(row_wise_linear):
    # One layer and row-wise linears: generation paths that batch tokens differently feed the indexer's top-k
    # bit-identical inputs (see row_wise_linear), so token-for-token comparisons cannot flip on a near-tie.
    return KeyeVL(tiny_config(num_hidden_layers=1)).eval()


def prompt(n):
    return torch.randint(0, 240, (n,)).tolist()


def greedy_reference(m, ids, steps):
    """Greedy decoding by re-running the whole sequence without any cache."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):  # embeddings, so that a generated <|image_pad|> id stays plain text
            tok = int(m(inputs_embeds=m.model.embed_tokens(torch.tensor(ids)), logits="last")[0].argmax())
            out.append(tok)
            ids.append(tok)
    return out


def test_greedy_generation_equals_uncached_recomputation(model):
    ids = prompt(30)  # grows past top-k (16): the cached sparse path is exercised
    res = generate(model, [GenerationRequest(ids, max_new_tokens=8, stop_token_ids=[])], prefill_chunk=7)[0]
    assert res.tokens == greedy_reference(model, ids, 8) and res.finish_reason == "length"


@pytest.mark.parametrize("temperatures,top_p", [((0.0,), 1.0), ((0.8,), 0.9), ((0.0, 0.8), 0.9)])
def test_batch_of_different_lengths_equals_each_alone(model, temperatures, top_p):
    """Greedy, sampled, and both in one batch (the greedy rows are picked together, the sampled ones row by row)."""
    reqs = [GenerationRequest(prompt(n), max_new_tokens=k, temperature=temperatures[i % len(temperatures)],
                              top_p=top_p, seed=i, stop_token_ids=[])
            for i, (n, k) in enumerate([(3, 9), (40, 5), (17, 12), (70, 1)])]
    batch = generate(model, reqs, prefill_chunk=16)
    for r, got in zip(reqs, batch):
        alone = generate(model, [r], prefill_chunk=64)[0]
        assert got.tokens == alone.tokens and len(got.tokens) == r.max_new_tokens


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    ids = prompt(10)
    r = [GenerationRequest(ids, max_new_tokens=20, temperature=1.5, seed=s, stop_token_ids=[]) for s in (1, 1, 2)]
    a, b, c = (x.tokens for x in generate(model, r))
    assert a == b and a != c


def test_stop_tokens_end_generation_and_are_not_returned(model):
    ids = prompt(12)
    free = generate(model, [GenerationRequest(ids, max_new_tokens=10, stop_token_ids=[])])[0].tokens
    stop = free[4]
    first = free.index(stop)
    res = generate(model, [GenerationRequest(ids, max_new_tokens=10, stop_token_ids=[stop, 9999])])[0]
    assert res.tokens == free[:first] and res.finish_reason == "stop"
    # default stop tokens: the config's eos ids
    model.config.eos_token_ids = [free[0]]
    res = generate(model, [GenerationRequest(ids, max_new_tokens=10)])[0]
    assert res.tokens == [] and res.finish_reason == "stop"


def test_streaming_callback_sees_every_token_in_order(model):
    reqs = [GenerationRequest(prompt(n), max_new_tokens=6, stop_token_ids=[]) for n in (4, 20)]
    seen = []
    res = generate(model, reqs, stream=lambda i, tok: seen.append((i, tok)))
    for i, r in enumerate(res):
        assert [t for j, t in seen if j == i] == r.tokens
    # decode is batched: tokens of the two requests interleave step by step
    assert [j for j, _ in seen[:4]] == [0, 1, 0, 1]


def test_image_and_video_prompt_matches_uncached_recomputation(model):
    processor = pytest.importorskip("keye.processor", reason="keye.processor (3D position ids) not present")
    c = model.config
    vs, ve, img, vid = c.vision_start_token_id, c.vision_end_token_id, c.image_token_id, c.video_token_id
    image_grid = torch.tensor([[1, 4, 6]])              # 2 x 3 merged tokens
    video_grid = torch.tensor([[1, 4, 4], [1, 4, 4]])   # two frames of 2 x 2 merged tokens, each its own grid
    ids = [1, 2, vs] + [img] * 6 + [ve, 5, vs, 7, 8] + [vid] * 4 + [7, 9] + [vid] * 4 + [ve, 11, 12]
    pos, nxt = processor.mrope_position_ids(torch.tensor(ids), image_grid, video_grid, image_token_id=img,
                                            video_token_id=vid)
    P = c.vision_config.patch_size
    vision = dict(pixel_values=torch.randn(24, 3, P, P), image_grid_thw=image_grid,
                  pixel_values_videos=torch.randn(32, 3, P, P), video_grid_thw=video_grid)
    req = GenerationRequest(ids, max_new_tokens=6, position_ids=pos, vision=vision, stop_token_ids=[])
    got = generate(model, [req], prefill_chunk=8)[0].tokens  # chunks split the image and the frames
    with torch.no_grad():  # reference: the whole sequence again at every step, no cache
        emb = model.embed(torch.tensor(ids), **vision)
        want = []
        for i in range(6):
            p = torch.cat([pos, processor.decode_position_ids(nxt, i)], 1)
            tok = int(model(inputs_embeds=emb, position_ids=p, logits="last")[0].argmax())
            want.append(tok)
            emb = torch.cat([emb, model.model.embed_tokens(torch.tensor([tok]))])
    assert got == want


def test_given_cache_is_used_and_released(model):
    cache = PagedKVCache(model.config, 4, dtype=torch.float32)
    generate(model, [GenerationRequest(prompt(100), max_new_tokens=50, stop_token_ids=[])], cache=cache)
    assert cache.free_pages == 4
    with pytest.raises(CacheFullError, match="more pages needed"):
        generate(model, [GenerationRequest(prompt(200), max_new_tokens=100, stop_token_ids=[])], cache=cache)
    assert cache.free_pages == 4  # released after the failure too


def test_dense_mode_generation_needs_no_index_cache(model):
    model.attention_mode = "dense"
    ids = prompt(30)
    res = generate(model, [GenerationRequest(ids, max_new_tokens=5, stop_token_ids=[])])[0]
    assert res.tokens == greedy_reference(model, ids, 5)


def test_bf16_generation_runs(model):
    m = model.to(torch.bfloat16)
    res = generate(m, [GenerationRequest(prompt(20), max_new_tokens=4, stop_token_ids=[])])[0]
    assert len(res.tokens) == 4 and all(0 <= t < 256 for t in res.tokens)


def test_sample_follows_its_specification():
    logits = torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0])
    assert sample(logits, 0.0, 1.0, None) == 1  # argmax, lowest id on ties
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(logits, 0)  # sorted: 1, 2 (0.39 each), 4 (0.14), 0 (0.05), 3 (0.02)
    draws = [sample(logits, 1.0, 0.5, g) for _ in range(200)]
    assert set(draws) == {1, 2}  # mass before token 2 is 0.39 < 0.5, before token 4 it is 0.79
    draws = [sample(logits, 1.0, 1.0, g) for _ in range(2000)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / 2000
    assert (freq - probs).abs().max() < 0.04


def test_bad_requests_give_clear_errors(model):
    bad = [(dict(input_ids=[]), "request 0: 'input_ids' must be a non-empty"),
           (dict(input_ids=[1, 300]), "'input_ids' must hold values in \\[0, 255\\]"),
           (dict(input_ids=[1], max_new_tokens=0), "'max_new_tokens' must be an int >= 1"),
           (dict(input_ids=[1], temperature=-1), "'temperature' must be a number >= 0"),
           (dict(input_ids=[1], top_p=0), "'top_p' must be in \\(0, 1\\]"),
           (dict(input_ids=[1, 2], position_ids=torch.zeros(3, 5, dtype=torch.long)), "'position_ids' must be"),
           (dict(input_ids=[1], vision={"pixel_values": torch.zeros(1)}), "'position_ids' \\[3, L\\] are required")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            generate(model, [GenerationRequest(**kw)])
    with pytest.raises(ValueError, match="'prefill_chunk' must be a positive int"):
        generate(model, [GenerationRequest([1])], prefill_chunk=0)
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        generate(model, [GenerationRequest([1])], cuda_graphs=True)
    with pytest.raises(ValueError, match="must be a GenerationRequest"):
        generate(model, [[1, 2]])
    assert generate(model, []) == []


# ---- memory plan ----------------------------------------------------------------------------------------------

def test_256k_context_fits_one_h200_with_the_full_bf16_model():
    c = keye_vl_2_30b_a3b()
    plan = plan_memory(c, 256 * 1024, device_bytes=141 * 10 ** 9)
    # weights: 31,122,082,160 bf16 parameters
    assert plan.weight_bytes == 2 * 31_122_082_160
    # K/V: 48 layers x (K + V) x 4 heads x 128 x 2 B; index keys: 48 x (64 fp8 + 4 B scale)
    assert kv_bytes_per_token(c) == 98_304 and index_bytes_per_token(c) == 3_264
    assert plan.cache_bytes == 262_144 * (98_304 + 3_264)  # 26.6 GB, whole pages
    assert plan.fits and plan.total_bytes < 100 * 10 ** 9, plan.summary()
    assert plan.max_context_tokens >= 256 * 1024
    # the same context in 16 requests still fits; a 1M-token context does not
    assert plan_memory(c, 256 * 1024, num_sequences=16).fits
    assert not plan_memory(c, 1 << 20).fits
    with pytest.raises(ValueError, match="num_sequences >= 1"):
        plan_memory(c, 10, num_sequences=0)
