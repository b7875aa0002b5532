"""The model on the GPU with keye's kernels (indexer, sparse attention, MoE), bf16, against the references."""

import pytest
import torch

from conftest import rel_err
from keye.model import GenerationRequest, KeyeVL, PagedKVCache, generate, tiny_config

pytestmark = pytest.mark.gpu


def gpu_config(**kw):
    # The released per-head shapes (head_dim 128, indexer 16 x 64, GQA 8:1 at fewer heads), small widths.
    base = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=1, head_dim=128,
                mrope_section=[16, 24, 24], num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
                indexer_num_heads=16, indexer_head_dim=64, index_topk=64, vocab_size=512, image_token_id=500,
                video_token_id=501, vision_start_token_id=502, vision_end_token_id=503, eos_token_ids=[511])
    base.update(kw)
    return tiny_config(**base)


def model_pair():
    torch.manual_seed(0)
    cpu = KeyeVL(gpu_config()).eval()
    gpu = KeyeVL(gpu_config()).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to("cuda", torch.bfloat16)


@pytest.mark.parametrize("mode", ["dense", "sparse", "auto"])
def test_kernel_path_tracks_the_fp32_cpu_reference(mode):
    cpu, gpu = model_pair()
    ids = torch.randint(0, 500, (300,))
    with torch.no_grad():
        ref = cpu(ids, attention_mode=mode)
        got = gpu(ids.cuda(), attention_mode=mode)
    # bf16 weights and activations; near-tied indexer keys may be chosen differently (bf16 head sums)
    assert rel_err(got.cpu(), ref) < 0.05


def test_packed_experts_track_the_plain_model():
    """KeyeVL.pack_experts on the GPU: prefill through the SwiGLU epilogue (h is not rounded to bf16, so not bitwise;
    the tolerance of the fp32 comparison above, since near-tied indexer keys may be chosen differently downstream),
    one-token decode steps through the decode kernels over the packed order (bitwise)."""
    _, gpu = model_pair()
    ids = torch.randint(0, 500, (300,), device="cuda")
    with torch.no_grad():
        want = gpu(ids)
        steps = []
        for packed in (False, True):
            if packed:
                err = rel_err(gpu.pack_experts()(ids), want)
                assert err < 0.05, f"prefill with packed experts: rel. error {err:.3g}"
            cache = PagedKVCache(gpu.config, 8, dtype=torch.bfloat16, device="cuda")
            s = cache.new_sequence()
            steps.append(torch.cat([gpu(ids[i:i + 1], cache=cache, step=cache.prepare([s], 1)) for i in range(8)]))
    gpu.unpack_experts()
    assert torch.equal(steps[1], steps[0]), f"decode steps differ: rel. error {rel_err(steps[1], steps[0]):.3g}"


def test_gpu_prefill_equals_decode_and_chunked_prefill():
    _, gpu = model_pair()
    T = 200
    ids = torch.randint(0, 500, (T,), device="cuda")
    with torch.no_grad():
        prefill = gpu(ids)
        for chunks in ([T], [50, 100, 50], [1] * T):
            cache = PagedKVCache(gpu.config, 8, dtype=torch.bfloat16, device="cuda")
            s = cache.new_sequence()
            out, a = [], 0
            for n in chunks:
                out.append(gpu(ids[a:a + n], cache=cache, step=cache.prepare([s], n)))
                a += n
            assert rel_err(torch.cat(out), prefill) < 0.03, chunks


def test_gpu_batch_generation_equals_each_alone():
    _, gpu = model_pair()
    reqs = [GenerationRequest(torch.randint(0, 500, (n,)).tolist(), max_new_tokens=16, stop_token_ids=[])
            for n in (5, 90, 300)]
    batch = generate(gpu, reqs, prefill_chunk=128)
    alone = [generate(gpu, [r], prefill_chunk=128)[0] for r in reqs]
    # bf16 batched GEMMs may round differently from single rows; demand most tokens agree
    agree = sum(a == b for x, y in zip(batch, alone) for a, b in zip(x.tokens, y.tokens))
    assert agree >= 0.9 * 48, [(x.tokens, y.tokens) for x, y in zip(batch, alone)]


def test_cuda_graph_decode_equals_eager_decode():
    from keye.model.cuda_graph import GraphedDecoder
    _, gpu = model_pair()
    cache = PagedKVCache(gpu.config, 32, dtype=torch.bfloat16, device="cuda")
    seqs = [cache.new_sequence() for _ in range(3)]
    with torch.no_grad():
        for s, n in zip(seqs, (10, 100, 300)):  # below and above top-k (64)
            gpu(torch.randint(0, 500, (n,), device="cuda"), cache=cache, step=cache.prepare([s], n))
        decoder = GraphedDecoder(gpu, cache)
        for i in range(3):  # capture on the first step, replay after
            ids = torch.randint(0, 500, (3,), device="cuda")
            pos = torch.tensor([10 + i, 100 + i, 300 + i], device="cuda").expand(3, -1)
            step = cache.prepare(seqs, 1)
            graphed = decoder(step, ids, pos)
            eager = gpu(ids, pos, cache=cache, step=step, logits="last")  # rewrites the same K/V
            assert rel_err(graphed, eager) < 1e-2, i
    assert list(decoder.graphs) == [3]


def test_generation_with_cuda_graphs_matches_eager():
    _, gpu = model_pair()
    reqs = [GenerationRequest(torch.randint(0, 500, (n,)).tolist(), max_new_tokens=12, stop_token_ids=[])
            for n in (20, 200)]
    eager = generate(gpu, reqs)
    graphed = generate(gpu, reqs, cuda_graphs=True)
    agree = sum(a == b for x, y in zip(eager, graphed) for a, b in zip(x.tokens, y.tokens))
    assert agree >= 0.9 * 24, [(x.tokens, y.tokens) for x, y in zip(eager, graphed)]


def test_checkpoint_loads_straight_onto_the_gpu(tmp_path):
    from keye.model import load_checkpoint, save_checkpoint
    cpu = KeyeVL(gpu_config()).to(torch.bfloat16)
    save_checkpoint(cpu, str(tmp_path), max_shard_bytes=1 << 20, expert_layout="per_expert")
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    gpu = load_checkpoint(str(tmp_path), device="cuda", dtype=torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in gpu.parameters())
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in gpu.parameters())
    # one copy of the weights (plus one tensor in flight)
    assert torch.cuda.max_memory_allocated() - before < 1.2 * weights
    for n, p in cpu.named_parameters():
        assert torch.equal(gpu.get_parameter(n).cpu(), p), n
