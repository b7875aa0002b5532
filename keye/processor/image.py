"""Pixels -> ViT input patches (docs/keye-vl-2.md §2.2, §3.1).

An image or video frame of (resized) size H x W, both multiples of patch * merge (= 28), becomes
gh * gw = (H/14) * (W/14) patches of shape [3, 14, 14] in plain raster order over the patch grid
(row-major: patch (r, c) is at index r * gw + c; frames of a video follow each other). Patches are NOT
pre-grouped into 2x2 blocks (Qwen2-VL does that; Keye does not): the projector gathers each 2x2 neighbourhood
from this raster order itself. The grid reported to the model is (t, gh, gw) in patch units, and the LM sees
t * gh * gw / merge**2 tokens.

Values: rescale 1/255, then (x - mean) / std with mean = std = 0.5 per channel (so pixels map to [-1, 1]).
Resizing (`resize_images`): images bicubic (the HF image processor resizes uint8 PIL images with BICUBIC),
video frames bilinear with antialias (the 1.5 HF processor `interpolate`s the uint8 frames), both emulating
uint8 resampling in torch on the input's device.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


CHUNK_ELEMENTS = 1 << 26  # source pixels x channels resized at once in video_to_patches (256 MB as float32)


@dataclass(frozen=True)
class PatchLayout:
    """ViT patch geometry; read from a config's vision section when one is given (`from_config`)."""

    patch_size: int = 14
    merge_size: int = 2
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        for name in ("patch_size", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PatchLayout: {name} must be a positive int, got {value!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"PatchLayout: {name} must have 3 channel values, got {value!r}")
        if min(self.std) <= 0:
            raise ValueError(f"PatchLayout: std must be > 0, got {self.std}")

    @property
    def factor(self) -> int:
        """Side of the pixel block behind one LM token (patch * merge = 28)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_config(cls, config) -> "PatchLayout":
        """From a dict (config.json contents, its `vision_config`, or preprocessor_config.json) or an object
        with the same attribute names. Missing keys keep the Keye defaults."""
        get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
        vision = get("vision_config")
        if vision is not None:
            return cls.from_config(vision)
        kwargs = {}
        for ours, theirs in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                             ("merge_size", "merge_size"), ("mean", "image_mean"), ("std", "image_std")):
            value = get(theirs)
            if value is not None:
                kwargs[ours] = tuple(value) if ours in ("mean", "std") else value
        return cls(**kwargs)


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    # Decoders and PIL hand out read-only arrays; torch warns about those, but nothing here writes to the input
    # (resizing makes new tensors), so share the memory instead of copying a possibly large video.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def to_uint8_hwc(image, name: str = "image") -> torch.Tensor:
    """An image as a uint8 torch tensor [H, W, 3]: from a torch tensor or numpy array of that shape, or a PIL
    image (converted to RGB). Anything else (floats, other channel counts, channels-first) is a ValueError:
    guessing the layout or value range would silently produce a wrong picture."""
    if hasattr(image, "convert") and hasattr(image, "size") and not isinstance(image, (np.ndarray, torch.Tensor)):
        image = np.asarray(image.convert("RGB"))  # PIL
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{name}: numpy array must be uint8, got {image.dtype}")
        image = _from_numpy(image)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name}: expected a uint8 tensor/ndarray [H, W, 3] or a PIL image, got "
                         f"{type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ValueError(f"{name}: tensor must be uint8, got {image.dtype}")
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape [H, W, 3], got {list(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: empty image {list(image.shape)}")
    return image


def resize_images(images: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, height, width] holding integer pixel values in [0, 255].

    The reference resizes uint8 pixels: images with PIL (BICUBIC), video frames with torch's uint8 `interpolate`
    (bilinear, antialias), both of which resample width first, then height, rounding to uint8 after each pass.
    This does the same two antialiased passes in float32 with that rounding in between, so it runs on any
    device; against PIL it is within 2 levels (mean difference < 0.01 level, tested when Pillow is installed),
    where a single float pass differs by up to ~20 levels on high-contrast detail.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"resize_images: expected uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"resize_images: mode must be 'bicubic' or 'bilinear', got {mode!r}")
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[3] != width:
        x = F.interpolate(x, size=(x.shape[2], width), mode=mode, align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    if x.shape[2] != height:
        x = F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    return x.contiguous()


def normalize(pixels: torch.Tensor, layout: PatchLayout = PatchLayout()) -> torch.Tensor:
    """[N, 3, H, W] values in [0, 255] -> (x / 255 - mean) / std, float32."""
    mean = torch.tensor(layout.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(layout.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def patchify(frames: torch.Tensor, layout: PatchLayout = PatchLayout()) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[t, C, H, W] -> (patches [t * gh * gw, C, p, p] in raster order per frame, grid (t, gh, gw)).
    H and W must be multiples of patch * merge so the 2x2 merge tiles the grid exactly."""
    if frames.dim() != 4:
        raise ValueError(f"patchify: expected [t, C, H, W], got {list(frames.shape)}")
    t, c, h, w = frames.shape
    if t == 0 or h % layout.factor or w % layout.factor or h == 0 or w == 0:
        raise ValueError(f"patchify: need t > 0 and H, W multiples of {layout.factor} (patch {layout.patch_size} x "
                         f"merge {layout.merge_size}), got {list(frames.shape)}")
    p = layout.patch_size
    gh, gw = h // p, w // p
    patches = frames.reshape(t, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # t, gh, gw, C, p, p
    return patches.reshape(t * gh * gw, c, p, p), (t, gh, gw)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `patchify`: [t * gh * gw, C, p, p] with grid (t, gh, gw) -> [t, C, gh * p, gw * p]."""
    t, gh, gw = (int(g) for g in grid)
    if patches.dim() != 4 or patches.shape[0] != t * gh * gw or patches.shape[2] != patches.shape[3]:
        raise ValueError(f"unpatchify: patches {list(patches.shape)} do not match grid {(t, gh, gw)}")
    _, c, p, _ = patches.shape
    return patches.reshape(t, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(t, c, gh * p, gw * p)


def image_to_patches(image, height: int, width: int, layout: PatchLayout = PatchLayout(),
                     device=None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One image (see `to_uint8_hwc`) resized to height x width (from smart_resize) -> (patches, (1, gh, gw))."""
    pixels = to_uint8_hwc(image)
    if device is not None:
        pixels = pixels.to(device)
    x = resize_images(pixels.unsqueeze(0), height, width, "bicubic")
    return patchify(normalize(x, layout), layout)


def video_to_patches(frames, height: int, width: int, layout: PatchLayout = PatchLayout(),
                     device=None) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Frames uint8 [N, H, W, 3] (tensor or ndarray) resized to height x width -> (patches of all frames in
    order, one grid (1, gh, gw) per frame: every frame is its own grid for the ViT and the 3D positions)."""
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise ValueError(f"video_to_patches: frames must be uint8, got {frames.dtype}")
        frames = _from_numpy(frames)
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 \
            or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError("video_to_patches: frames must be a non-empty uint8 tensor/ndarray [N, H, W, 3], got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} {list(getattr(frames, 'shape', []))}")
    # Resize in chunks: a float copy of all frames at source size would be huge (720 frames of 1080p = 18 GB),
    # while the resized frames are at most 256 tokens each.
    step = max(1, CHUNK_ELEMENTS // (frames.shape[1] * frames.shape[2] * 3))
    chunks = []
    for i in range(0, frames.shape[0], step):
        chunk = frames[i:i + step] if device is None else frames[i:i + step].to(device)
        chunks.append(normalize(resize_images(chunk, height, width, "bilinear"), layout))
    patches, (t, gh, gw) = patchify(torch.cat(chunks), layout)
    return patches, [(1, gh, gw)] * t
