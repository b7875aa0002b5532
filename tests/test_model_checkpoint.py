"""Checkpoint I/O: a fixture with the released Keye-VL-2.0 names (written here from the documented name table,
independently of keye.model), fused and per-expert experts, bit-exact save/load round trips, clear errors, and
the parameter count of the full 30B-A3B configuration."""

import json

import pytest
import torch
from safetensors.torch import save_file

from keye.model import (CheckpointError, KeyeVL, keye_vl_2_30b_a3b, load_checkpoint, parameter_count,
                        save_checkpoint, tiny_config)

import test_model_modules

one_thread = test_model_modules.one_thread  # shared autouse fixture


# The tiny config as an HF config.json would hold it (flat LM fields, rope_scaling, sa_config, vision_config).
HF_CONFIG = {
    "architectures": ["KeyeVL2MoeForConditionalGeneration"], "model_type": "KeyeVL2",
    "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}, "max_position_embeddings": 4096,
    "tie_word_embeddings": False, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
    "norm_topk_prob": True, "sa_config": {"indexer_num_heads": 4, "indexer_head_dim": 32, "topk": 16},
    "image_token_id": 250, "video_token_id": 251, "vision_start_token_id": 248, "vision_end_token_id": 249,
    "eos_token_id": 255,
    "vision_config": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "patch_size": 14, "image_size": 56, "num_packing_positions": 64},
}


def released_names(c: dict, experts: str) -> dict:
    """{name: shape} following docs/keye-vl-2.md sec. 4.2 for an HF config dict."""
    v = c["vision_config"]
    D, P, I_v = v["hidden_size"], v["patch_size"], v["intermediate_size"]
    g = v["image_size"] // P
    H, hd, nq, nkv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    E, I = c["num_experts"], c["moe_intermediate_size"]
    Hi, Di = c["sa_config"]["indexer_num_heads"], c["sa_config"]["indexer_head_dim"]
    V = c["vocab_size"]
    vm = "visual.vision_model."
    out = {vm + "embeddings.patch_embedding.weight": (D, 3, P, P), vm + "embeddings.patch_embedding.bias": (D,),
           vm + "embeddings.position_embedding.weight": (g * g, D),
           vm + "embeddings.packing_position_embedding.weight": (v["num_packing_positions"], D),
           vm + "post_layernorm.weight": (D,), vm + "post_layernorm.bias": (D,)}
    for i in range(v["num_hidden_layers"]):
        p = f"{vm}encoder.layers.{i}."
        for proj in ("q", "k", "v", "out"):
            out[f"{p}self_attn.{proj}_proj.weight"], out[f"{p}self_attn.{proj}_proj.bias"] = (D, D), (D,)
        for ln in ("layer_norm1", "layer_norm2"):
            out[f"{p}{ln}.weight"], out[f"{p}{ln}.bias"] = (D,), (D,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (I_v, D), (I_v,)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (D, I_v), (D,)
    M = 4 * D
    out.update({"mlp_AR.pre_norm.weight": (M,), "mlp_AR.pre_norm.bias": (M,), "mlp_AR.linear_1.weight": (M, M),
                "mlp_AR.linear_1.bias": (M,), "mlp_AR.linear_2.weight": (H, M), "mlp_AR.linear_2.bias": (H,),
                "model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)})
    for L in range(c["num_hidden_layers"]):
        p = f"model.layers.{L}."
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (H,)
        out[p + "self_attn.q_proj.weight"] = (nq * hd, H)
        out[p + "self_attn.k_proj.weight"] = out[p + "self_attn.v_proj.weight"] = (nkv * hd, H)
        out[p + "self_attn.o_proj.weight"] = (H, nq * hd)
        out[p + "self_attn.q_norm.weight"] = out[p + "self_attn.k_norm.weight"] = (hd,)
        out[p + "self_attn.sa_indexer.q_proj.weight"] = (Hi * Di + Hi, H)
        out[p + "self_attn.sa_indexer.k_proj.weight"] = (Di, H)
        out[p + "self_attn.sa_indexer.q_norm.weight"] = (Di,)
        out[p + "self_attn.sa_indexer.k_norm.weight"] = out[p + "self_attn.sa_indexer.k_norm.bias"] = (Di,)
        out[p + "mlp.gate.weight"] = (E, H)
        if experts == "fused":
            out[p + "mlp.experts.gate_up_proj"] = (E, H, 2 * I)
            out[p + "mlp.experts.down_proj"] = (E, I, H)
        else:
            for e in range(E):
                out[f"{p}mlp.experts.{e}.gate_proj.weight"] = out[f"{p}mlp.experts.{e}.up_proj.weight"] = (I, H)
                out[f"{p}mlp.experts.{e}.down_proj.weight"] = (H, I)
    return out


def write_fixture(path, experts="fused", shards=3, drop=(), extra=None, reshape=None, dtype=torch.bfloat16):
    """A released-format checkpoint of random tensors; returns {name: tensor}."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    names = released_names(HF_CONFIG, experts)
    names.update(extra or {})
    names.update(reshape or {})
    tensors = {n: torch.randn(s).to(dtype) for n, s in names.items() if n not in drop}
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def test_fixture_with_released_fused_names_loads(tmp_path):
    tensors = write_fixture(tmp_path)
    m = load_checkpoint(str(tmp_path), dtype=torch.bfloat16)
    params = dict(m.named_parameters())
    assert set(params) == set(tensors)
    for n, t in tensors.items():
        assert torch.equal(params[n], t), n
    assert params["model.layers.1.self_attn.sa_indexer.q_proj.weight"].shape == (4 * 32 + 4, 64)
    assert not m.training and m.config.index_topk == 16 and m.config.rope_theta == 10000.0


def test_fixture_with_per_expert_names_loads_into_fused_layout(tmp_path):
    tensors = write_fixture(tmp_path, experts="per_expert", shards=4)
    m = load_checkpoint(str(tmp_path), dtype=torch.float32)
    for L in range(2):
        ex = m.model.layers[L].mlp.experts
        for e in range(8):
            p = f"model.layers.{L}.mlp.experts.{e}."
            assert torch.equal(ex.gate_up_proj[e, :, :24], tensors[p + "gate_proj.weight"].float().t())
            assert torch.equal(ex.gate_up_proj[e, :, 24:], tensors[p + "up_proj.weight"].float().t())
            assert torch.equal(ex.down_proj[e], tensors[p + "down_proj.weight"].float().t())
    # the same weights, fused: the same model output
    fused = {}
    for L in range(2):
        p = f"model.layers.{L}.mlp.experts."
        fused[p + "gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}{e}.gate_proj.weight"].t(),
                                                            tensors[f"{p}{e}.up_proj.weight"].t()], 1)
                                                 for e in range(8)])
        fused[p + "down_proj"] = torch.stack([tensors[f"{p}{e}.down_proj.weight"].t() for e in range(8)])
    ids = torch.randint(0, 240, (20,))
    with torch.no_grad():
        a = m(ids)
        for n, t in fused.items():
            m.get_parameter(n).copy_(t.float())
        b = m(ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, layout, dtype):
    m = KeyeVL(tiny_config()).to(dtype)
    save_checkpoint(m, str(tmp_path), max_shard_bytes=100_000, expert_layout=layout)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    back = load_checkpoint(str(tmp_path), dtype=dtype)
    a, b = dict(m.named_parameters()), dict(back.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        assert b[n].dtype == dtype and torch.equal(a[n], b[n]), n
    if layout == "per_expert":
        assert "model.layers.0.mlp.experts.7.down_proj.weight" in index["weight_map"]
    ids = torch.randint(0, 240, (12,))
    with torch.no_grad():
        assert torch.equal(m(ids), back(ids))


def test_tied_embeddings_save_without_lm_head_and_load(tmp_path):
    m = KeyeVL(tiny_config(tie_word_embeddings=True))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    save_checkpoint(m, str(tmp_path))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    back = load_checkpoint(str(tmp_path), dtype=torch.float32)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.lm_head.weight, m.model.embed_tokens.weight)


def test_missing_unexpected_and_misshaped_tensors_are_all_named(tmp_path):
    write_fixture(tmp_path, drop={"model.layers.1.self_attn.sa_indexer.k_norm.bias", "lm_head.weight"},
                  extra={"model.layers.0.self_attn.rotary.inv_freq": (16,)},
                  reshape={"model.layers.0.self_attn.sa_indexer.q_proj.weight": (4 * 32, 64)})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path))
    msg = str(e.value)
    assert "2 missing tensors" in msg and "model.layers.1.self_attn.sa_indexer.k_norm.bias" in msg
    assert "lm_head.weight" in msg
    assert "1 unexpected tensors" in msg and "model.layers.0.self_attn.rotary.inv_freq" in msg
    assert "1 mis-shaped tensors" in msg
    assert "model.layers.0.self_attn.sa_indexer.q_proj.weight: checkpoint [128, 64], model expects [132, 64]" in msg


def test_unused_packing_position_embedding_may_be_absent(tmp_path):
    name = "visual.vision_model.embeddings.packing_position_embedding.weight"
    tensors = write_fixture(tmp_path, drop={name})
    m = load_checkpoint(str(tmp_path), dtype=torch.float32)
    assert m.visual.vision_model.embeddings.packing_position_embedding is None
    assert all(torch.equal(m.get_parameter(n), t.float()) for n, t in tensors.items())
    ids = torch.tensor([1, 2] + [250] * 4 + [3])
    with torch.no_grad():
        m(ids, torch.arange(7).expand(3, -1), pixel_values=torch.randn(16, 3, 14, 14),
          image_grid_thw=torch.tensor([[1, 4, 4]]))
    save_checkpoint(m, str(tmp_path / "again"))  # and saves without it
    assert name not in json.loads((tmp_path / "again" / "model.safetensors.index.json").read_text())["weight_map"]


def test_incomplete_per_expert_set_names_the_missing_experts(tmp_path):
    write_fixture(tmp_path, experts="per_expert",
                  drop={"model.layers.1.mlp.experts.5.up_proj.weight"},
                  extra={"model.layers.0.mlp.experts.8.down_proj.weight": (64, 24)},
                  reshape={"model.layers.0.mlp.experts.2.down_proj.weight": (24, 64)})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path))
    msg = str(e.value)
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in msg.split("missing tensors")[1]
    assert "experts.8.down_proj.weight (expert 8 >= num_experts 8)" in msg
    assert "model.layers.0.mlp.experts.2.down_proj.weight: checkpoint [24, 64], model expects [64, 24]" in msg
    assert "1 missing tensors" in msg  # the mis-shaped expert is reported once, as mis-shaped


def test_bad_checkpoint_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "absent"), config=tiny_config())
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors.index.json nor model.safetensors"):
        load_checkpoint(str(tmp_path), config=tiny_config())
    write_fixture(tmp_path / "c")
    (tmp_path / "c" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        load_checkpoint(str(tmp_path / "c"))
    write_fixture(tmp_path / "d")
    index = json.loads((tmp_path / "d" / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors"
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / "d" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not hold"):
        load_checkpoint(str(tmp_path / "d"))
    (tmp_path / "d" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="'weight_map'"):
        load_checkpoint(str(tmp_path / "d"))
    write_fixture(tmp_path / "e", reshape={"model.norm.weight": (64,)}, dtype=torch.bfloat16)
    save_file({"model.norm.weight": torch.ones(64, dtype=torch.int32)},
              str(tmp_path / "e" / "model-00001-of-00003.safetensors"))
    index = json.loads((tmp_path / "e" / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not v.startswith("model-00001")}
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / "e" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.norm.weight: I32"):
        load_checkpoint(str(tmp_path / "e"))


def test_single_file_checkpoint_loads(tmp_path):
    m = KeyeVL(tiny_config())
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    save_file({n: p.detach() for n, p in m.named_parameters()}, str(tmp_path / "model.safetensors"))
    back = load_checkpoint(str(tmp_path), dtype=torch.float32)
    assert all(torch.equal(p, back.get_parameter(n)) for n, p in m.named_parameters())


def test_full_config_parameter_count_matches_the_released_total():
    # HF reports safetensors.total = 31,122,082,160 for Keye-VL-2.0-30B-A3B (docs/keye-vl-2.md sec. 4.3).
    c = keye_vl_2_30b_a3b()
    with torch.device("meta"):
        m = KeyeVL(c)
    assert sum(p.numel() for p in m.parameters()) == parameter_count(c) == 31_122_082_160
    names = {n: tuple(p.shape) for n, p in m.named_parameters()}
    full = dict(HF_CONFIG, vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                num_key_value_heads=4, head_dim=128, num_experts=128, moe_intermediate_size=768,
                sa_config={"indexer_num_heads": 16, "indexer_head_dim": 64, "topk": 2048},
                vision_config={"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                               "patch_size": 14, "image_size": 384, "num_packing_positions": 32768})
    assert names == released_names(full, "fused")
