"""KeyeProcessor output drives the model: a tiny random KeyeVL (real Qwen3 token ids) embeds the processor's
pixels at the processor's placeholder ranges and runs forward / generate on its position ids."""

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers", reason="tokenizers not installed (pip install tokenizers)")
model_config = pytest.importorskip("keye.model.config", reason="keye.model not available")
keye_vl = pytest.importorskip("keye.model.keye_vl", reason="keye.model not available")

from keye.processor import KeyeProcessor, VideoBudget  # noqa: E402


@pytest.fixture(scope="module")
def setup(qwen3_tokenizer):
    tok = qwen3_tokenizer
    proc = KeyeProcessor(tok, video_budget=VideoBudget(total_tokens=256))
    cfg = model_config.tiny_config(vocab_size=151936, image_token_id=tok.token_id("<|image_pad|>"),
                                   video_token_id=tok.token_id("<|video_pad|>"),
                                   vision_start_token_id=tok.token_id("<|vision_start|>"),
                                   vision_end_token_id=tok.token_id("<|vision_end|>"),
                                   eos_token_ids=[tok.token_id("<|im_end|>")])
    torch.manual_seed(0)
    model = keye_vl.KeyeVL(cfg).float().eval()
    rng = np.random.default_rng(0)
    msgs = [{"role": "user", "content": [
        {"type": "image", "image": rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)},
        {"type": "video", "video": rng.integers(0, 256, (2, 56, 56, 3), dtype=np.uint8), "timestamps": [0.0, 0.5]},
        {"type": "text", "text": "What changes between the frames?"}]}]
    return proc, model, proc(msgs)


VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@torch.no_grad()
def test_vision_features_land_on_the_processor_ranges(setup):
    proc, model, out = setup
    emb = model.embed(out["input_ids"], **{k: out[k] for k in VISION_KEYS})
    image_feats = model.encode_vision(out["pixel_values"], out["image_grid_thw"])
    video_feats = model.encode_vision(out["pixel_values_videos"], out["video_grid_thw"])
    (s, e), = out["image_token_ranges"].tolist()
    assert torch.equal(emb[s:e], image_feats.to(emb.dtype))
    start = 0
    for s, e in out["video_frame_token_ranges"].tolist():
        assert torch.equal(emb[s:e], video_feats[start:start + e - s].to(emb.dtype))
        start += e - s
    assert start == video_feats.shape[0]


@torch.no_grad()
def test_forward_and_generate_accept_processor_output(setup):
    proc, model, out = setup
    logits = model(out["input_ids"], out["position_ids"], **{k: out[k] for k in VISION_KEYS})
    assert logits.shape == (out["input_ids"].numel(), 151936) and torch.isfinite(logits).all()
    from keye.model.generate import GenerationRequest, generate

    req = GenerationRequest(out["input_ids"], max_new_tokens=2, position_ids=out["position_ids"],
                            vision={k: out[k] for k in VISION_KEYS})
    (result,) = generate(model, [req])
    # Greedy decoding's first token is the argmax of the full forward's last logits.
    assert result.tokens[0] == int(torch.argmax(logits[-1].float()))
