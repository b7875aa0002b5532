"""Keye-VL-2.0 configuration: the released 30B-A3B values, tiny test configs, and the HF config.json format.

The HF config is flat (language-model fields at top level) with a nested ``vision_config``, the M-RoPE sections
under ``rope_scaling`` and the DSA indexer under ``sa_config`` (see /work/shared/docs/keye-vl-2.md sec. 2, 4).
Values the doc marks *inferred* are fields here, overridden by config.json when it has them:
rope_theta, mrope_interleaved, indexer_num_heads / indexer_head_dim, vocab_size.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 384                 # 384 / 14 = 27: the learned position grid is 27 x 27
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0           # 2D RoPE inside the ViT attention
    num_packing_positions: int = 32768    # packing_position_embedding rows (in the checkpoint, unused at inference)
    spatial_merge_size: int = 2           # mlp_AR merges 2 x 2 patches into one LM token

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class KeyeConfig:
    # Language model (Qwen3-30B-A3B shape)
    vocab_size: int = 151936              # inferred (param-count fit)
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 8_000_000.0       # inferred: not read from the 2.0 config (sglang indexer default 8e6)
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    mrope_interleaved: bool = False       # inferred: Qwen2-VL layout (doc sec. 2.4); Qwen3-VL would be True
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    # MoE
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    # DSA lightning indexer (sa_config)
    indexer_num_heads: int = 16           # inferred (param-count fit)
    indexer_head_dim: int = 64            # inferred (param-count fit)
    index_topk: int = 2048
    # Projector
    projector_layer_norm_eps: float = 1e-5
    # Special tokens
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_ids: list[int] = field(default_factory=lambda: [151645, 151643])
    vision_config: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"keye.KeyeConfig: {msg}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even, got {self.head_dim}")
        need(len(self.mrope_section) == 3 and 2 * sum(self.mrope_section) == self.head_dim,
             f"mrope_section {self.mrope_section} must have 3 entries summing to head_dim/2 = {self.head_dim // 2}")
        scaled = [s * self.indexer_head_dim for s in self.mrope_section]
        need(all(s % self.head_dim == 0 for s in scaled),
             f"mrope_section {self.mrope_section} scaled by indexer_head_dim/head_dim "
             f"({self.indexer_head_dim}/{self.head_dim}) must stay integral")
        need(1 <= self.num_experts_per_tok <= self.num_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}]")
        need(self.index_topk >= 1, f"index_topk must be >= 1, got {self.index_topk}")
        v = self.vision_config
        need(v.hidden_size % v.num_attention_heads == 0 and v.head_dim % 4 == 0,
             f"vision head_dim ({v.hidden_size}/{v.num_attention_heads}) must be a multiple of 4 (2D RoPE)")

    @property
    def indexer_mrope_section(self) -> list[int]:
        """M-RoPE sections of the indexer: the LM's scaled by D_I / head_dim ([16,24,24] -> [8,12,12] at 64)."""
        return [s * self.indexer_head_dim // self.head_dim for s in self.mrope_section]

    # ---- HF config.json ---------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict) -> "KeyeConfig":
        """Build from an HF-style dict (flat LM fields, vision_config, rope_scaling, sa_config); unknown keys
        are ignored, absent keys keep the released defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"keye.KeyeConfig.from_dict: expected a dict, got {type(d).__name__}")
        if isinstance(d.get("text_config"), dict):  # Qwen3-VL-style nesting: LM fields under text_config
            d = {**d, **d["text_config"]}
        unsupported = {"mlp_only_layers": lambda v: bool(v), "decoder_sparse_step": lambda v: v != 1,
                       "attention_bias": lambda v: bool(v), "shared_expert_intermediate_size": lambda v: bool(v)}
        bad = {k: d[k] for k, is_bad in unsupported.items() if k in d and is_bad(d[k])}
        if bad:
            raise ValueError(f"keye.KeyeConfig.from_dict: unsupported settings {bad} (keye builds MoE in every "
                             "layer, no attention bias, no shared expert, as Keye-VL-2.0-30B-A3B)")
        names = {f.name for f in dataclasses.fields(cls)} - {"vision_config"}
        kw = {k: d[k] for k in names if k in d}
        rs = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if "rope_theta" in rs and "rope_theta" not in d:
            kw["rope_theta"] = rs["rope_theta"]
        if "mrope_section" in rs:
            kw["mrope_section"] = list(rs["mrope_section"])
        if "mrope_interleaved" in rs:
            kw["mrope_interleaved"] = bool(rs["mrope_interleaved"])
        sa = d.get("sa_config") or {}
        for src, dst in (("indexer_num_heads", "indexer_num_heads"), ("indexer_head_dim", "indexer_head_dim"),
                         ("topk", "index_topk")):
            if src in sa:
                kw[dst] = sa[src]
        if "eos_token_id" in d and "eos_token_ids" not in d:
            eos = d["eos_token_id"]
            kw["eos_token_ids"] = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        vnames = {f.name for f in dataclasses.fields(VisionConfig)}
        vd = d.get("vision_config") or {}
        kw["vision_config"] = VisionConfig(**{k: vd[k] for k in vnames if k in vd})
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("mrope_section"), d.pop("mrope_interleaved")
        d["rope_scaling"] = {"type": "mrope", "mrope_section": list(self.mrope_section),
                             "mrope_interleaved": self.mrope_interleaved}
        d["sa_config"] = {"indexer_num_heads": d.pop("indexer_num_heads"),
                          "indexer_head_dim": d.pop("indexer_head_dim"), "topk": d.pop("index_topk")}
        d["architectures"] = ["KeyeVL2MoeForConditionalGeneration"]
        d["model_type"] = "KeyeVL2"
        return d

    @classmethod
    def from_json(cls, path: str) -> "KeyeConfig":
        """Read config.json (a file, or a directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"keye.KeyeConfig.from_json: no config file at {path}")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"keye.KeyeConfig.from_json: {path} is not valid JSON ({e})") from None
        return cls.from_dict(d)

    def save_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


def keye_vl_2_30b_a3b() -> KeyeConfig:
    """The released Keye-VL-2.0-30B-A3B configuration (inferred fields as documented above)."""
    return KeyeConfig()


def tiny_config(**overrides) -> KeyeConfig:
    """A small random-test configuration with the released structure (2 layers, hidden 64, 4/2 heads of 32,
    8 experts top-2, indexer 4 x 32, a 2-layer ViT of width 32 on a 4 x 4 position grid)."""
    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                          patch_size=14, image_size=56, num_packing_positions=64)
    kw = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, rope_theta=10000.0, mrope_section=[4, 6, 6], max_position_embeddings=4096,
              num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, indexer_num_heads=4,
              indexer_head_dim=32, index_topk=16, image_token_id=250, video_token_id=251,
              vision_start_token_id=248, vision_end_token_id=249, eos_token_ids=[255], vision_config=vision)
    kw.update(overrides)
    return KeyeConfig(**kw)


__all__ = ["VisionConfig", "KeyeConfig", "keye_vl_2_30b_a3b", "tiny_config"]
