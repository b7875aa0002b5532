"""KeyeProcessor: a conversation with images and videos -> the model's input tensors.

    proc = KeyeProcessor.from_pretrained("/path/to/Keye-VL-2.0-30B-A3B")        # tokenizer.json (+ configs)
    batch = proc([{"role": "user", "content": [
        {"type": "image", "image": img_uint8_hwc},
        {"type": "video", "video": frames_uint8_nhwc, "timestamps": [0.0, 0.5, ...]},
        {"type": "text", "text": "What happens?"}]}])

`proc(messages, generation_prefix="<think>\\n")` starts the assistant turn with that text; `device="cuda"` does the
pixel work on the GPU. `proc.prompt_text(messages)` shows the expanded prompt without any pixel work.

Images: uint8 [H, W, 3] torch tensor or numpy array, or a PIL image. Videos: uint8 [N, H, W, 3] frames already
sampled (the video reader picks them, 2 fps / 2..2880 frames for 2.0) plus one timestamp in seconds per frame.

Returned dict (all tensors on `device`, default CPU; T = prompt length):
  input_ids                 int64 [T]
  position_ids              int64 [3, T]      3D M-RoPE positions (keye.processor.positions)
  next_position             int64 []          position of the first generated token (same in all 3 rows)
  pixel_values              float32 [Pi, 3, 14, 14]  image patches, raster order per image, images in order
  image_grid_thw            int64 [num_images, 3]   (1, gh, gw) in patches; LM tokens = gh * gw / 4
  image_token_ranges        int64 [num_images, 2]   [start, end) of each image's <|image_pad|> run
  pixel_values_videos       float32 [Pv, 3, 14, 14] frame patches, frames in order, videos in order
  video_grid_thw            int64 [num_frames, 3]   one (1, gh, gw) row per frame (every frame its own grid)
  video_frame_token_ranges  int64 [num_frames, 2]   [start, end) of each frame's <|video_pad|> run
  video_num_frames          int64 [num_videos]
  video_timestamps          float32 [num_frames]
Empty image/video entries have a leading dimension of 0, so the keys are always present.
"""

import json
from pathlib import Path

import numpy as np
import torch

from keye.processor.budget import VideoBudget, video_frame_size
from keye.processor.chat import (DEFAULT_SYSTEM_PROMPT, IMAGE_PAD, VIDEO_PAD, build_chat, image_segments,
                                 video_segments)
from keye.processor.image import PatchLayout, image_to_patches, to_uint8_hwc, video_to_patches
from keye.processor.positions import mrope_position_ids
from keye.processor.resize import MAX_PIXELS, MIN_PIXELS, smart_resize
from keye.processor.tokenizer import KeyeTokenizer


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"KeyeProcessor.from_pretrained: cannot read {path}: {e}") from e


def _timestamps(value, num_frames: int, where: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"{where}: a video part needs 'timestamps' (seconds, one per frame)")
    ts = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if ts.ndim != 1 or ts.shape[0] != num_frames:
        raise ValueError(f"{where}: 'timestamps' must be 1-D with one value per frame ({num_frames}), got shape "
                         f"{list(ts.shape)}")
    if not np.isfinite(ts).all() or (ts < 0).any():
        raise ValueError(f"{where}: 'timestamps' must be finite and >= 0")
    if (np.diff(ts) < 0).any():
        raise ValueError(f"{where}: 'timestamps' must be non-decreasing (frames in time order)")
    return ts


class KeyeProcessor:
    def __init__(self, tokenizer: KeyeTokenizer, *, layout: PatchLayout = PatchLayout(),
                 image_min_pixels: int = MIN_PIXELS, image_max_pixels: int = MAX_PIXELS,
                 video_budget: VideoBudget = VideoBudget(), default_system: str | None = DEFAULT_SYSTEM_PROMPT):
        if not isinstance(tokenizer, KeyeTokenizer):
            raise ValueError(f"KeyeProcessor: tokenizer must be a KeyeTokenizer, got {type(tokenizer).__name__}")
        # Validates the pixel limits once, here, rather than on the first image.
        smart_resize(layout.factor, layout.factor, factor=layout.factor,
                     min_pixels=image_min_pixels, max_pixels=image_max_pixels)
        self.tokenizer = tokenizer
        self.layout = layout
        self.image_min_pixels, self.image_max_pixels = image_min_pixels, image_max_pixels
        self.video_budget = video_budget
        self.default_system = default_system
        self.image_token_id = tokenizer.token_id(IMAGE_PAD)
        self.video_token_id = tokenizer.token_id(VIDEO_PAD)

    @classmethod
    def from_pretrained(cls, path, extra_special_tokens: dict[str, int] | None = None, **kwargs) -> "KeyeProcessor":
        """From a local checkpoint folder: tokenizer.json (required); config.json's vision_config and
        preprocessor_config.json (optional) set the patch layout and image pixel limits; their image/video token
        ids, if present, must agree with the tokenizer. kwargs override everything."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"KeyeProcessor.from_pretrained: {path} is not a folder")
        tokenizer = KeyeTokenizer(path, extra_special_tokens)
        config = _read_json(path / "config.json") or {}
        pre = _read_json(path / "preprocessor_config.json") or {}
        if "layout" not in kwargs:
            merged = {**(config.get("vision_config") or {}), **pre}
            kwargs["layout"] = PatchLayout.from_config(merged)
        for ours, theirs in (("image_min_pixels", "min_pixels"), ("image_max_pixels", "max_pixels")):
            if ours not in kwargs and pre.get(theirs) is not None:
                kwargs[ours] = int(pre[theirs])
        for key, name in (("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD),
                          ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
            if key in config and config[key] != tokenizer.token_id(name):
                raise ValueError(f"KeyeProcessor.from_pretrained: config.json {key} = {config[key]} but the "
                                 f"tokenizer has {name} at {tokenizer.token_id(name)}")
        return cls(tokenizer, **kwargs)

    def _plan(self, messages: list[dict], add_generation_prompt: bool, generation_prefix: str):
        """Validate the vision parts, choose every image / frame size and lay out the prompt (no pixel work).
        Returns (ChatPrompt, items) with items = [("image", uint8 [H, W, 3], h, w, None) |
        ("video", frames, h, w, timestamps)] in order of appearance."""
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"KeyeProcessor: messages must be a list of {{'role', 'content'}} dicts, got "
                             f"{type(messages).__name__}")
        # Needed before the first video is sized: several videos in one request split the token budget.
        num_videos = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), (list, tuple))
                         for p in m["content"] if isinstance(p, dict) and p.get("type") == "video")
        f = self.layout.factor
        items = []

        def vision_segments(part: dict) -> list:
            where = f"KeyeProcessor: {part['type']} part {len(items)}"
            if part["type"] == "image":
                if "image" not in part:
                    raise ValueError(f"{where}: an image part needs the key 'image'")
                image = to_uint8_hwc(part["image"], where)
                h, w = smart_resize(int(image.shape[0]), int(image.shape[1]), factor=f,
                                    min_pixels=self.image_min_pixels, max_pixels=self.image_max_pixels)
                items.append(("image", image, h, w, None))
                return image_segments((h // f) * (w // f))
            frames = part.get("video")
            shape = getattr(frames, "shape", None)
            if shape is None or len(shape) != 4 or 0 in tuple(shape) or shape[3] != 3 \
                    or getattr(frames, "dtype", None) not in (np.uint8, torch.uint8):
                raise ValueError(f"{where}: 'video' must be non-empty uint8 frames [N, H, W, 3], got "
                                 f"{type(frames).__name__} {getattr(frames, 'dtype', '')} "
                                 f"{None if shape is None else list(shape)}")
            n, H, W = int(shape[0]), int(shape[1]), int(shape[2])
            ts = _timestamps(part.get("timestamps"), n, where)
            h, w = video_frame_size(n, H, W, self.video_budget, num_videos, f)
            items.append(("video", frames, h, w, ts))
            return video_segments([(h // f) * (w // f)] * n, ts)

        prompt = build_chat(messages, vision_segments, add_generation_prompt, self.default_system, generation_prefix)
        return prompt, items

    def prompt_text(self, messages: list[dict], add_generation_prompt: bool = True, generation_prefix: str = "") -> str:
        """The expanded prompt as text (placeholders repeated), without pixel work; long for big videos."""
        return self._plan(messages, add_generation_prompt, generation_prefix)[0].text()

    def __call__(self, messages: list[dict], add_generation_prompt: bool = True, generation_prefix: str = "",
                 device=None) -> dict:
        """The model inputs of one conversation (keys in the module doc). `generation_prefix` starts the
        assistant turn (e.g. "<think>\\n"); `device` places every tensor (pixel work runs there too)."""
        prompt, items = self._plan(messages, add_generation_prompt, generation_prefix)
        images, image_grids, videos, frame_grids, num_frames, stamps = [], [], [], [], [], []
        for kind, source, h, w, ts in items:
            if kind == "image":
                patches, grid = image_to_patches(source, h, w, self.layout, device)
                images.append(patches)
                image_grids.append(grid)
            else:
                patches, grids = video_to_patches(source, h, w, self.layout, device)
                videos.append(patches)
                frame_grids.extend(grids)
                num_frames.append(len(grids))
                stamps.append(ts)
        input_ids, image_ranges, frame_ranges = prompt.token_ids(self.tokenizer)
        image_grid_thw = torch.tensor(image_grids, dtype=torch.long).view(-1, 3)
        video_grid_thw = torch.tensor(frame_grids, dtype=torch.long).view(-1, 3)
        position_ids, next_position = mrope_position_ids(
            input_ids, image_grid_thw, video_grid_thw, image_token_id=self.image_token_id,
            video_token_id=self.video_token_id, merge_size=self.layout.merge_size)
        p = self.layout.patch_size
        empty = torch.empty(0, 3, p, p, dtype=torch.float32, device=device)
        out = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "next_position": next_position,
            "pixel_values": torch.cat(images) if images else empty,
            "image_grid_thw": image_grid_thw,
            "image_token_ranges": torch.tensor(image_ranges, dtype=torch.long).view(-1, 2),
            "pixel_values_videos": torch.cat(videos) if videos else empty,
            "video_grid_thw": video_grid_thw,
            "video_frame_token_ranges": torch.tensor(frame_ranges, dtype=torch.long).view(-1, 2),
            "video_num_frames": torch.tensor(num_frames, dtype=torch.long),
            "video_timestamps": torch.from_numpy(np.concatenate(stamps).astype(np.float32)) if stamps
            else torch.empty(0, dtype=torch.float32),
        }
        return {k: v.to(device) if device is not None else v for k, v in out.items()}
