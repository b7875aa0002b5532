"""keye.model against independent implementations in Hugging Face transformers (CPU, fp32, random tiny weights):

* the ViT against PaddleOCR-VL's vision tower, the same Keye-style SigLIP NaViT (interpolated 27 x 27 position
  grid, 2D RoPE, attention per image; docs/keye-vl-2.md sec. 1);
* the language model (dense attention) against Qwen3-VL-MoE's text model (Qwen3 GQA + q/k norm, M-RoPE,
  softmax top-k renormalised MoE), which the Keye-VL-2.0 remote code derives from. Qwen3-VL interleaves its
  M-RoPE sections, so keye runs with mrope_interleaved=True here.

Needs `pip install transformers` (tested with 5.24.0); skipped without it.
"""

import pytest
import torch

from conftest import rel_err
from keye.model import KeyeVL, tiny_config

import test_model_modules

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install transformers)")
one_thread = test_model_modules.one_thread  # shared autouse fixture


def test_vision_tower_matches_paddleocr_vl():
    from transformers.models.paddleocr_vl.configuration_paddleocr_vl import PaddleOCRVisionConfig
    from transformers.models.paddleocr_vl.modeling_paddleocr_vl import PaddleOCRVisionModel

    m = KeyeVL(tiny_config()).eval()
    vc = m.config.vision_config
    hf_cfg = PaddleOCRVisionConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                                   num_hidden_layers=vc.num_hidden_layers, num_attention_heads=vc.num_attention_heads,
                                   num_channels=3, image_size=vc.image_size, patch_size=vc.patch_size,
                                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=vc.layer_norm_eps,
                                   rope_parameters={"rope_type": "axial", "rope_theta": vc.rope_theta})
    hf_cfg._attn_implementation = "eager"
    hf = PaddleOCRVisionModel(hf_cfg).eval()
    # Keye resizes the table with align_corners=False (vLLM keye.py, sglang keye_vit.py); transformers <= 5.17 had
    # True for PaddleOCR-VL, later releases False: pin the Keye rule.
    hf.vision_model.embeddings.interpolation_align_corners = False
    state = {k[len("visual."):]: v for k, v in m.state_dict().items()
             if k.startswith("visual.") and "packing_position_embedding" not in k}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k or "position_ids" in k for k in missing), (missing, unexpected)

    grid = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4]])  # grids smaller and larger than the 4 x 4 table
    n = int(grid.prod(1).sum())
    pix = torch.randn(n, 3, vc.patch_size, vc.patch_size)
    with torch.no_grad():
        ours = m.visual(pix, grid)
        theirs = hf(pixel_values=pix.unsqueeze(0), grid_thw=grid).last_hidden_state.reshape(n, -1)
    assert rel_err(ours, theirs) < 1e-5


def test_language_model_matches_qwen3_vl_moe_text_model():
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextModel

    cfg = tiny_config(mrope_interleaved=True)
    m = KeyeVL(cfg).eval()
    hf_cfg = Qwen3VLMoeTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "mrope_section": cfg.mrope_section,
                         "mrope_interleaved": True})
    hf_cfg._attn_implementation = "eager"
    hf = Qwen3VLMoeTextModel(hf_cfg).eval()
    state = {}
    for k, v in m.model.state_dict().items():
        if ".sa_indexer." in k:
            continue
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            v = v.transpose(1, 2)  # transformers 5 keeps experts as [E, out, in]
        state[k] = v
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)

    T = 23
    ids = torch.randint(0, 240, (T,))
    # 3D positions as an image would give them: text, then a 3 x 4 grid at t = 5, then text again
    t = torch.cat([torch.arange(5), torch.full((12,), 5), torch.arange(9, 15)])
    h = torch.cat([torch.arange(5), 5 + torch.arange(3).repeat_interleave(4), torch.arange(9, 15)])
    w = torch.cat([torch.arange(5), 5 + torch.arange(4).repeat(3), torch.arange(9, 15)])
    pos = torch.stack([t, h, w])
    with torch.no_grad():
        ctx = m.model.context(pos, "dense", torch.tensor([0, T], dtype=torch.int32))
        ours = m.model(m.model.embed_tokens(ids), ctx)
        theirs = hf(input_ids=ids.unsqueeze(0), position_ids=pos.unsqueeze(1)).last_hidden_state[0]
    assert rel_err(ours, theirs) < 1e-5


@pytest.mark.parametrize("interleaved", [False, True])
def test_mrope_tables_match_qwen_vl(interleaved):
    # Keye's non-interleaved layout is Qwen2-VL's; the interleaved one is Qwen3-VL's.
    from keye.model.rope import mrope_cos_sin
    if interleaved:
        from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig as Config
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextRotaryEmbedding as Rope
    else:
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig as Config
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding as Rope
    cfg = Config(hidden_size=4096, num_attention_heads=32, head_dim=128,
                 rope_parameters={"rope_type": "default", "rope_theta": 8e6, "mrope_section": [16, 24, 24]})
    pos = torch.randint(0, 300_000, (3, 50))
    cos, sin = Rope(cfg)(torch.zeros(1, dtype=torch.float32), pos.unsqueeze(1))
    ours = mrope_cos_sin(pos, 128, 8e6, [16, 24, 24], interleaved)
    assert torch.equal(ours[0], cos[0]) and torch.equal(ours[1], sin[0])
