"""The Keye chat format with images and videos (docs/keye-vl-2.md §3.4).

ChatML (Keye Preview template; assumed unchanged for 2.0, which was not verified):

    <|im_start|>system\\n{system}<|im_end|>\\n          (inserted if the first message is not a system message and
                                                      default_system is not None: "You are a helpful assistant.")
    <|im_start|>{role}\\n{content}<|im_end|>\\n         per message
    <|im_start|>assistant\\n{generation_prefix}        if add_generation_prompt (prefix default "")

Content parts are concatenated with nothing in between:
* text: as is;
* image with an LM grid of n = t*gh*gw/merge^2 tokens: `<|vision_start|>` + `<|image_pad|>` * n + `<|vision_end|>`;
* video: `<|vision_start|>`, then for each frame j: `<|frame|>` + format(timestamp_j, ".1f") + `<|video_pad|>` * n_j,
  then `<|vision_end|>` (1.5 processor format, assumed for 2.0). Timestamps are formatted from their float32
  value, as the reference keeps them in a FloatTensor (float64 0.15 would print "0.1", float32 prints "0.2").

The prompt is a list of segments (text, or a run of one special token). Text segments are tokenized; special tokens
are emitted as ids resolved by name, which equals tokenizing the expanded string because special tokens are
split out before BPE (tested).
"""

from dataclasses import dataclass, field

import numpy as np
import torch

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
FRAME = "<|frame|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Strings a user text may not contain: they would turn into placeholders the vision inputs do not match.
RESERVED_IN_TEXT = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, FRAME, "<|vision_pad|>")
ROLES = ("system", "user", "assistant")  # tool turns: Keye's format for them was not found


@dataclass(frozen=True)
class Special:
    """`count` repetitions of one special token; `kind` tags placeholder runs ("image" / "frame") for ranges."""

    token: str
    count: int = 1
    kind: str = ""


@dataclass
class ChatPrompt:
    segments: list = field(default_factory=list)  # str | Special

    def text(self) -> str:
        return "".join(s if isinstance(s, str) else s.token * s.count for s in self.segments)

    def token_ids(self, tokenizer) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
        """(input_ids [T] int64, image token ranges, video frame token ranges); ranges are [start, end) in
        input_ids, one per image / per video frame in order of appearance."""
        ids: list[int] = []
        image_ranges, frame_ranges = [], []
        text_run: list[str] = []

        def flush():
            if text_run:
                ids.extend(tokenizer.encode("".join(text_run)))
                text_run.clear()

        for s in self.segments:
            if isinstance(s, str):
                text_run.append(s)
                continue
            # Emitted by id (resolved by name, so a tokenizer without e.g. <|frame|> raises instead of
            # silently spelling it out as "<", "|", "frame", ...).
            flush()
            start = len(ids)
            ids.extend([tokenizer.token_id(s.token)] * s.count)
            if s.kind:
                (image_ranges if s.kind == "image" else frame_ranges).append((start, len(ids)))
        flush()
        return torch.tensor(ids, dtype=torch.long), image_ranges, frame_ranges


def format_timestamp(seconds) -> str:
    """Frame timestamp text: float32 value formatted with ".1f"."""
    value = float(np.float32(seconds))
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"format_timestamp: timestamp must be finite and >= 0, got {seconds!r}")
    return format(value, ".1f")


def image_segments(num_tokens: int) -> list:
    return [Special(VISION_START), Special(IMAGE_PAD, num_tokens, "image"), Special(VISION_END)]


def video_segments(tokens_per_frame: list[int], timestamps) -> list:
    """One video: per frame `<|frame|>` + timestamp text + its `<|video_pad|>` run, inside vision start/end."""
    if len(tokens_per_frame) == 0:
        raise ValueError("video_segments: a video needs at least one frame")
    if timestamps is None or len(timestamps) != len(tokens_per_frame):
        raise ValueError(f"video_segments: need one timestamp per frame ({len(tokens_per_frame)}), got "
                         f"{None if timestamps is None else len(timestamps)}")
    out = [Special(VISION_START)]
    for n, ts in zip(tokens_per_frame, timestamps):
        out += [Special(FRAME), format_timestamp(ts), Special(VIDEO_PAD, n, "frame")]
    out.append(Special(VISION_END))
    return out


def check_text(text, where: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{where}: text must be str, got {type(text).__name__}")
    for token in RESERVED_IN_TEXT:
        if token in text:
            raise ValueError(f"{where}: text contains the reserved token {token!r}; pass images and videos as "
                             f"content parts instead")
    return text


def build_chat(messages: list[dict], vision_segments, add_generation_prompt: bool = True,
               default_system: str | None = DEFAULT_SYSTEM_PROMPT, generation_prefix: str = "") -> ChatPrompt:
    """ChatPrompt of `messages`. Each message is {"role": ..., "content": str | list of parts}; a part is
    {"type": "text", "text": str} or {"type": "image" | "video", ...}. `vision_segments(part)` returns the
    segments of an image/video part (called in order of appearance). `generation_prefix` is text the assistant
    turn starts with (e.g. "<think>\\n" to force thinking; the 2.0 template's own choice is unverified)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("build_chat: messages must be a non-empty list of {'role', 'content'} dicts")
    segments: list = []
    for i, msg in enumerate(messages):
        where = f"build_chat: messages[{i}]"
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"{where} must be a dict with 'role' and 'content'")
        role = msg["role"]
        if role not in ROLES:
            raise ValueError(f"{where}: role must be one of {ROLES}, got {role!r}")
        if i == 0 and role != "system" and default_system is not None:
            segments += [Special(IM_START), "system\n" + check_text(default_system, "build_chat: default_system"),
                         Special(IM_END), "\n"]
        segments += [Special(IM_START), role + "\n"]
        content = msg["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, (list, tuple)):
            raise ValueError(f"{where}: content must be a str or a list of parts, got {type(content).__name__}")
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                segments.append(check_text(part.get("text"), f"{where}.content[{j}]"))
            elif kind in ("image", "video"):
                if role == "system":
                    raise ValueError(f"{where}: a system message cannot hold {kind}s")
                segments += vision_segments(part)
            else:
                raise ValueError(f"{where}.content[{j}] must be a dict with type 'text', 'image' or 'video', "
                                 f"got {part!r:.80}")
        segments += [Special(IM_END), "\n"]
    if add_generation_prompt:
        segments += [Special(IM_START), "assistant\n" + check_text(generation_prefix, "build_chat: generation_prefix")]
    elif generation_prefix:
        raise ValueError("build_chat: generation_prefix needs add_generation_prompt=True")
    return ChatPrompt(segments)
