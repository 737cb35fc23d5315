"""
Images as Qwen's image processor makes them (Qwen2VLImageProcessorPil, in numpy): the
checkpoint's image settings (preprocessor_config.json), smart_resize to whole merged patches
within the pixel limits, RGB conversion as transformers does it, and the patch flattening the
vision encoder reads. Equal to transformers to 1e-5 for any image size (tests/test_data.py).

    pixel_values, grid_thw = images.preprocess_image("cat.jpg")     # [N, 1176], (1, h, w)
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageConfig:
    """The image half of preprocessor_config.json (defaults = Qwen2.5-VL-3B-Instruct's file)."""
    min_pixels: int = 56 * 56                    # 3136
    max_pixels: int = 28 * 28 * 16384            # 12845056; the class default 1003520 is not the hub file's
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD

    @classmethod
    def qwen3(cls):
        """Qwen/Qwen3-VL-4B-Instruct's preprocessor_config.json: 16-pixel patches, mean = std = 0.5,
        size {shortest_edge: 65536, longest_edge: 16777216}."""
        return cls(min_pixels=65536, max_pixels=16777216, patch_size=16,
                   image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))

    @classmethod
    def from_dict(cls, d, defaults=None):
        # transformers lets min_pixels/max_pixels override size={shortest_edge, longest_edge}
        size = d.get("size") or {}
        c = defaults or cls()
        c.min_pixels = int(d.get("min_pixels") or size.get("shortest_edge") or c.min_pixels)
        c.max_pixels = int(d.get("max_pixels") or size.get("longest_edge") or c.max_pixels)
        for k in ("patch_size", "temporal_patch_size", "merge_size"):
            setattr(c, k, int(d.get(k, getattr(c, k))))
        c.image_mean = tuple(d.get("image_mean", c.image_mean))
        c.image_std = tuple(d.get("image_std", c.image_std))
        return c

    @classmethod
    def from_pretrained(cls, path):
        path = Path(path)
        defaults = cls.qwen3() if is_qwen3(path) else cls()   # what a key the file leaves out means
        for name, part in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            file = path / name                     # transformers 5 may nest it in the second
            if not file.exists():
                continue
            try:
                d = json.loads(file.read_text(encoding="utf-8"))
                return cls.from_dict(d if part is None else d.get(part, {}), defaults)
            except (ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"{file}: not a valid image processor config ({type(e).__name__}: {e})") from None
        return defaults


def is_qwen3(path):
    """A Qwen3-VL checkpoint directory: its config.json says model_type "qwen3_vl", or (a
    tokenizer-only directory) its preprocessor_config.json names the Qwen3-VL processor."""
    for name, key, want in (("config.json", "model_type", "qwen3_vl"),
                            ("preprocessor_config.json", "processor_class", "Qwen3VLProcessor")):
        try:
            d = json.loads((Path(path) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and key in d:
            return d[key] == want
    return False


def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 16384):
    """(h, w) rounded to multiples of `factor` with h*w in [min_pixels, max_pixels], aspect kept.
    Same arithmetic as transformers' smart_resize, including its rounding quirks."""
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image):
    """PIL RGB image from a path, PIL image or HWC uint8 array. Transparency is composited onto
    white, as transformers' convert_to_rgb does (a plain .convert('RGB') would give black)."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            im.load()
            image = im.copy()
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = _to_8bit(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(im):
    """16-bit greyscale (PIL modes I;16*, or I holding values above 255) scaled to 8 bits:
    PIL's own convert() clips at 255, which turns such images almost white. (PIL already keeps
    the high byte of 16-bit RGB/RGBA PNGs.)"""
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    x = np.asarray(im).astype(np.float64)
    if im.mode == "I" and x.max(initial=0) <= 255:
        return Image.fromarray(x.clip(0, 255).astype(np.uint8), "L")     # already 8-bit values
    return Image.fromarray(np.rint(x.clip(0, 65535) / 257).astype(np.uint8), "L")


def _has_alpha(im):
    return "A" in im.getbands() or im.info.get("transparency") is not None


def preprocess_image(image, min_pixels=56 * 56, max_pixels=28 * 28 * 16384, mean=OPENAI_CLIP_MEAN,
                     std=OPENAI_CLIP_STD, patch_size=14, temporal_patch_size=2, merge_size=2):
    """One image -> (pixel_values float32 [N, 3*T*p*p] = [N, 1176], grid_thw LongTensor [3] = (1, h, w)).
    N = h*w patches of 14x14; every 2x2 block of patches becomes one LM token (N/4 <|image_pad|>)."""
    pixel_values, grid_thw = preprocess_np(image, min_pixels, max_pixels, mean, std, patch_size,
                                            temporal_patch_size, merge_size)
    return torch.from_numpy(pixel_values), torch.tensor(grid_thw, dtype=torch.long)


def preprocess_np(image, min_pixels, max_pixels, mean, std, patch_size, temporal_patch_size, merge_size):
    image = to_rgb(image)
    factor = patch_size * merge_size
    h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    image = image.resize((w, h), resample=Image.BICUBIC)          # PIL takes (width, height)
    # rescale in float64 then cast, normalise in float32: the reference's exact order of operations
    x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)      # (H, W, 3)
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    gh, gw, m, p, c = h // patch_size, w // patch_size, merge_size, patch_size, 3
    x = x.transpose(2, 0, 1).reshape(c, gh // m, m, p, gw // m, m, p)
    # patch order: merge-groups row-major, the m*m patches of a group contiguous, so the merger
    # can fuse each 2x2 group by a plain reshape
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)                          # (gh/m, gw/m, m, m, C, p, p)
    # a still image is a 2-frame clip of the same frame (Conv3d patch embed has temporal kernel 2)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
    return np.ascontiguousarray(x).reshape(gh * gw, c * temporal_patch_size * p * p), (1, gh, gw)


def image_size(image):
    """(width, height) from a PIL image or just the file header."""
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(image) as im:
        return im.size
