"""Keye-VL-2.0 processor: tokenizer, chat format, image/video patches, video token budget, 3D position ids.

Entry point: `KeyeProcessor` (conversation -> model input tensors). The parts are usable alone; importing this
package does not import `tokenizers` (only `KeyeTokenizer()` does).
"""

from keye.processor.budget import VideoBudget, max_tokens_per_frame, video_frame_size
from keye.processor.chat import ChatPrompt, build_chat, format_timestamp
from keye.processor.image import PatchLayout, image_to_patches, patchify, unpatchify, video_to_patches
from keye.processor.positions import decode_position_ids, mrope_position_ids
from keye.processor.processor import KeyeProcessor
from keye.processor.resize import smart_resize
from keye.processor.tokenizer import KeyeTokenizer, find_qwen3_tokenizer_dir

__all__ = [
    "ChatPrompt", "KeyeProcessor", "KeyeTokenizer", "PatchLayout", "VideoBudget", "build_chat",
    "decode_position_ids", "find_qwen3_tokenizer_dir", "format_timestamp", "image_to_patches",
    "max_tokens_per_frame", "mrope_position_ids", "patchify", "smart_resize", "unpatchify", "video_frame_size",
    "video_to_patches",
]
