"""Load and save Keye-VL-2.0 checkpoints in the Hugging Face layout (config.json + safetensors shards).

Names are the released ones: ``visual.vision_model.*``, ``mlp_AR.*``, ``model.*``, ``lm_head.*``, the indexer
under ``model.layers.L.self_attn.sa_indexer.*``. Experts may be fused (``mlp.experts.gate_up_proj`` [E, H, 2I],
``mlp.experts.down_proj`` [E, I, H]) or per expert (``mlp.experts.e.{gate,up}_proj.weight`` [I, H],
``mlp.experts.e.down_proj.weight`` [H, I], nn.Linear layout); the model keeps the fused layout.

Loading first reads only the shard headers and checks every name and shape against the model built on the meta
device, raising one CheckpointError that lists all missing, unexpected and mis-shaped tensors before any data
is read. Then it reads shard by shard, each tensor straight onto the target device, so the weights exist once.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from keye.model.config import KeyeConfig
from keye.model.keye_vl import KeyeVL

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Tensors the released loaders skip: the SigLIP pooling head (unused by Keye).
IGNORED_PREFIXES = ("visual.vision_model.head.",)
# Parameters no inference path reads: when a checkpoint lacks them the loaded model goes without (module None).
OPTIONAL = {"visual.vision_model.embeddings.packing_position_embedding.weight"}
_LIST = 20  # names shown per category in an error


class CheckpointError(ValueError):
    """The checkpoint does not match the model (names, shapes, dtypes or files)."""


def _shard_map(path: str) -> dict[str, str]:
    """{tensor name: shard file path} from the index, or from a single model.safetensors."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"keye.load_checkpoint: checkpoint directory {path!r} does not exist")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"keye.load_checkpoint: {index} is not a safetensors index with a 'weight_map' "
                                  f"({e!r})") from None
        absent = sorted({s for s in weight_map.values() if not os.path.isfile(os.path.join(path, s))})
        if absent:
            raise FileNotFoundError(f"keye.load_checkpoint: shards listed in {INDEX_FILE} are missing from {path}: "
                                    f"{absent}")
        return {k: os.path.join(path, s) for k, s in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"keye.load_checkpoint: {path} holds neither {INDEX_FILE} nor {SINGLE_FILE}")


def _headers(shards: dict[str, str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype string)} read from the shard headers (no tensor data)."""
    by_file = defaultdict(set)
    for k, s in shards.items():
        by_file[s].add(k)
    out = {}
    for s, names in by_file.items():
        with safe_open(s, framework="pt") as f:
            have = set(f.keys())
            absent = sorted(names - have)
            if absent:
                raise CheckpointError(f"keye.load_checkpoint: the index places {len(absent)} tensors in "
                                      f"{os.path.basename(s)} that it does not hold: {absent[:_LIST]}")
            for k in names:
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _fmt(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _LIST} more" if len(items) > _LIST else ""
    return f"\n  {len(items)} {title}:\n    " + "\n    ".join(items[:_LIST]) + more


def check_checkpoint(model: nn.Module, headers: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, list]:
    """Match checkpoint tensors to the model's parameters. Returns {param name: [(ckpt name, slot)]} where slot
    is None (whole tensor) or (expert, part); raises CheckpointError listing every problem."""
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    plan: dict[str, list] = defaultdict(list)
    unexpected, misshaped, bad_dtype = [], [], []
    per_expert_seen = defaultdict(set)
    present = set()  # model parameters the checkpoint names (even when mis-shaped: reported once, as such)
    for name, (shape, dtype) in sorted(headers.items()):
        if name.startswith(IGNORED_PREFIXES):
            continue
        if dtype not in ("BF16", "F16", "F32", "F64"):
            bad_dtype.append(f"{name}: {dtype}")
            continue
        m = _PER_EXPERT.match(name)
        if m:
            prefix, e, part = m.group(1), int(m.group(2)), m.group(3)
            target = f"{prefix}.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}"
            if target not in expected:
                unexpected.append(name)
                continue
            E, a, b = expected[target]
            want = (b, a) if part == "down_proj" else (b // 2, a)  # nn.Linear [out, in] of the fused slice
            if e >= E:
                unexpected.append(f"{name} (expert {e} >= num_experts {E})")
                continue
            per_expert_seen[target].add((e, part))
            if shape != want:
                misshaped.append(f"{name}: checkpoint {list(shape)}, model expects {list(want)}")
            else:
                plan[target].append((name, (e, part)))
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        present.add(name)
        if shape != expected[name]:
            misshaped.append(f"{name}: checkpoint {list(shape)}, model expects {list(expected[name])}")
        else:
            plan[name].append((name, None))
    missing = []
    for name, shape in expected.items():
        if name in present and per_expert_seen[name]:
            misshaped.append(f"{name}: given both fused and per expert")
        elif per_expert_seen[name]:
            E = shape[0]
            need = {(e, p) for e in range(E) for p in (("down_proj",) if name.endswith("down_proj")
                                                         else ("gate_proj", "up_proj"))}
            prefix = name.rsplit(".", 1)[0]
            missing.extend(f"{prefix}.{e}.{p}.weight" for e, p in sorted(need - per_expert_seen[name]))
        elif name not in present and name not in OPTIONAL:
            missing.append(name)
    if missing or unexpected or misshaped or bad_dtype:
        msg = "keye.load_checkpoint: the checkpoint does not match the model configuration"
        for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                             ("mis-shaped tensors", misshaped), ("tensors of a non-float dtype", bad_dtype)):
            if items:
                msg += _fmt(title, items)
        raise CheckpointError(msg)
    return plan


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, attr = name.rsplit(".", 1)
    mod = model.get_submodule(mod_name)
    old = getattr(mod, attr)
    setattr(mod, attr, nn.Parameter(tensor, requires_grad=old.requires_grad))


def _device_string(device) -> str:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


def load_checkpoint(path: str, *, device="cpu", dtype: torch.dtype = torch.bfloat16,
                    config: KeyeConfig | None = None, attention_mode: str = "auto") -> KeyeVL:
    """Build KeyeVL from a local HF-format checkpoint directory on `device` in `dtype` (eval mode)."""
    config = KeyeConfig.from_json(path) if config is None else config
    with torch.device("meta"):
        model = KeyeVL(config, attention_mode=attention_mode)
    shards = _shard_map(path)
    plan = check_checkpoint(model, _headers(shards))
    params = dict(model.named_parameters())
    fused: dict[str, torch.Tensor] = {}
    by_file = defaultdict(list)
    for target, entries in plan.items():
        for ckpt_name, slot in entries:
            by_file[shards[ckpt_name]].append((ckpt_name, target, slot))
    dev = _device_string(device)
    for shard in sorted(by_file):
        with safe_open(shard, framework="pt", device=dev) as f:
            for ckpt_name, target, slot in by_file[shard]:
                t = f.get_tensor(ckpt_name).to(dtype)
                if slot is None:
                    _set_param(model, target, t)
                    continue
                if target not in fused:
                    fused[target] = torch.empty(params[target].shape, dtype=dtype, device=dev)
                e, part = slot
                half = fused[target].shape[-1] // 2
                if part == "gate_proj":
                    fused[target][e, :, :half] = t.t()
                elif part == "up_proj":
                    fused[target][e, :, half:] = t.t()
                else:
                    fused[target][e] = t.t()
                del t
    for target, t in fused.items():
        _set_param(model, target, t)
    for name in OPTIONAL:
        if name not in plan:  # absent from the checkpoint: drop the unused module rather than invent weights
            owner, attr = name.rsplit(".", 1)[0].rsplit(".", 1)
            setattr(model.get_submodule(owner), attr, None)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # check_checkpoint guarantees this cannot happen; guard against made-up weights anyway
        raise CheckpointError(f"keye.load_checkpoint: parameters left unloaded: {still_meta[:_LIST]}")
    return model.pack_input_projections().eval()


def _export_tensors(model: KeyeVL, expert_layout: str):
    """(name, shape, nbytes, producer) in checkpoint order; producer() gives the CPU tensor when called."""
    out = []
    for name, p in model.named_parameters():
        experts = model.get_submodule(name.rsplit(".", 1)[0]) if name.endswith("mlp.experts.gate_up_proj") else None
        if expert_layout == "per_expert" and name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            prefix = name.rsplit(".", 1)[0]
            E, a, b = p.shape
            for e in range(E):
                if name.endswith("down_proj"):
                    out.append((f"{prefix}.{e}.down_proj.weight", (b, a), p.element_size() * a * b,
                                lambda p=p, e=e: p[e].t()))
                else:
                    for part, sl in (("gate_proj", slice(0, b // 2)), ("up_proj", slice(b // 2, b))):
                        out.append((f"{prefix}.{e}.{part}.weight", (b // 2, a), p.element_size() * a * b // 2,
                                    lambda m=experts, e=e, sl=sl: m.gate_up_checkpoint_order(slice(e, e + 1))[0, :, sl].t()))
        elif experts is not None:  # the checkpoint's column order, also from packed experts (KeyeVL.pack_experts)
            out.append((name, tuple(p.shape), p.numel() * p.element_size(), experts.gate_up_checkpoint_order))
        else:
            out.append((name, tuple(p.shape), p.numel() * p.element_size(), lambda p=p: p))
    return out


def save_checkpoint(model: KeyeVL, path: str, *, max_shard_bytes: int = 5 * 2 ** 30,
                    expert_layout: str = "fused") -> None:
    """Write config.json, numbered shards (model-00001-of-00003.safetensors, ...) and model.safetensors.index.json.
    expert_layout "fused" (the model's layout) or "per_expert". Tensors go to the CPU one shard at a time."""
    if expert_layout not in ("fused", "per_expert"):
        raise ValueError(f"keye.save_checkpoint: 'expert_layout' must be 'fused' or 'per_expert', got "
                         f"{expert_layout!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"keye.save_checkpoint: 'max_shard_bytes' must be positive, got {max_shard_bytes}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("keye.save_checkpoint: the model has meta (unmaterialised) parameters")
    os.makedirs(path, exist_ok=True)
    model.config.save_json(os.path.join(path, "config.json"))
    tensors = _export_tensors(model, expert_layout)
    shards, cur, size = [], [], 0
    for item in tensors:
        if cur and size + item[2] > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += item[2]
    if cur:
        shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # copies: safetensors refuses tensors that share memory (packed projections are views of one buffer)
        data = {name: make().detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                for name, _, _, make in shard}
        save_file(data, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in data})
        del data
    index = {"metadata": {"total_size": sum(t[2] for t in tensors)}, "weight_map": weight_map}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)


__all__ = ["load_checkpoint", "save_checkpoint", "check_checkpoint", "CheckpointError", "INDEX_FILE"]
