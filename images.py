"""
Images as Qwen's image processor makes them (Qwen2VLImageProcessorPil, in numpy): the
checkpoint's image settings (preprocessor_config.json), smart_resize to whole merged patches
within the pixel limits, RGB conversion as transformers does it, and the patch flattening the
vision encoder reads. Equal to transformers to 1e-5 for any image size (tests/test_data.py).
An image file is read upright: its EXIF orientation is applied, as transformers' load_image
does for a path (a phone photo taken sideways); a PIL image passed in is used as it is, as the
image processor does. A file that is missing, truncated, corrupt or too large to decode is an
ImageError that names it.

    pixel_values, grid_thw = images.preprocess_image("cat.jpg")     # [N, 1176], (1, h, w)
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


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
        c.image_mean = tuple(float(x) for x in d.get("image_mean", c.image_mean))
        c.image_std = tuple(float(x) for x in d.get("image_std", c.image_std))
        c.check()
        return c

    def check(self):
        """ValueError unless every number is usable: a zero patch or an unbounded pixel limit
        would fail (or allocate without end) only when the first image is processed."""
        for k, low, high in (("patch_size", 1, 1024), ("temporal_patch_size", 1, 16), ("merge_size", 1, 16),
                             ("min_pixels", 1, 1 << 30), ("max_pixels", self.min_pixels, 1 << 30)):
            if not low <= getattr(self, k) <= high:
                raise ValueError(f"{k} {getattr(self, k)} is outside {low}..{high}")
        if (len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(map(math.isfinite, self.image_mean))
                or not all(math.isfinite(x) and x > 0 for x in self.image_std)):
            raise ValueError(f"image_mean and image_std must be 3 finite numbers (std > 0), not "
                             f"{self.image_mean}, {self.image_std}")

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


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file."""


def open_image(path):
    """The image in file `path`, decoded whole and upright (its EXIF orientation applied, as
    transformers.image_utils.load_image does). ImageError names the file and what is wrong."""
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)        # a copy, turned if the file says so
    except FileNotFoundError:
        raise ImageError(f"image {path}: file not found") from None
    except Exception as e:               # PIL raises many types: truncated, corrupt, a bomb
        raise ImageError(f"image {path}: unreadable ({type(e).__name__}: {e})") from None


def to_rgb(image):
    """PIL RGB image from a path (read by open_image: upright), PIL image or HWC uint8 array.
    Transparency is composited onto white, as transformers' convert_to_rgb does (a plain
    .convert('RGB') would give black)."""
    if isinstance(image, (str, Path)):
        image = open_image(image)
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


def check_image(path):
    """Reasons an image file can't be used (empty = good). Decodes it fully: a truncated file
    fails here, not mid-training."""
    if not Path(path).is_file():
        return [f"image not found: {path}"]
    try:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
    except Exception as e:                # PIL raises many types for corrupt files
        return [f"unreadable image: {path} ({type(e).__name__}: {e})"]
    if max(w, h) / min(w, h) > 200:       # smart_resize refuses these
        return [f"image aspect ratio over 200: {path} ({w}x{h})"]
    return []


EXIF_ORIENTATION = 0x0112
TURNED = (5, 6, 7, 8)          # orientations that swap width and height


def image_size(image):
    """(width, height) from a PIL image or just the file header, upright as open_image reads it."""
    if isinstance(image, Image.Image):
        return image.size
    try:
        with Image.open(image) as im:
            w, h = im.size
            turned = im.getexif().get(EXIF_ORIENTATION) in TURNED
    except FileNotFoundError:
        raise ImageError(f"image {image}: file not found") from None
    except Exception as e:
        raise ImageError(f"image {image}: unreadable ({type(e).__name__}: {e})") from None
    return (h, w) if turned else (w, h)
