"""Images in: decoding to RGB under limits, and Idefics3's adaptive patching (one module).

Decoding (`load_image`, `load_images`): PNG, JPEG and WebP from bytes, a path or a PIL image;
EXIF orientation applied; RGBA/LA/transparent palette composited on white, palette,
greyscale, 16-bit greyscale (I;16, scaled, not clipped) and CMYK made RGB. Pillow's
decompression-bomb guard stays on, and `ImageLimits` caps encoded bytes, decoded pixels and
the number of images per sample. Every failure is an `ImageError` naming the image's
1-based position: "image 2: truncated PNG (…)".

Patching (`split_image`, `preprocess`) follows transformers' Idefics3 image processor, with
one change: a small image is never upscaled. With T = tile side (the vision encoder's
`image_size`), M = `longest_edge` (default 4·T; at most 6·T, as Idefics3's tokenizers
carry `<row_r_col_c>` markers up to 6×6) and S = `<image>` tokens per tile
((T / patch)² / scale_factor²):

1. resize so the longer side is min(L, M), L the image's longer side (Idefics3's
   `_resize_output_size_rescale_to_max_len`: shorter side = int(longer / aspect ratio),
   rounded up to even; both ≤ 4096);
2. resize up to whole tiles: longer side → ceil(·/T)·T, then the shorter side from the aspect
   ratio, also rounded up to a multiple of T;
3. if that is one tile, the image is one T×T view: `<fake_token_around_image><global-img>`
   + S × `<image>` + `<fake_token_around_image>` = S + 3 tokens;
4. else a grid of rows × cols T×T crops (row-major), each `<fake_token_around_image>
   <row_r_col_c>` + S × `<image>`, a newline after each row, then a newline and the global
   view (the whole image resized to T×T) as in 3: rows·(cols·(S + 2) + 1) + S + 3 tokens
   (+1 with a tokenizer that splits "\\n\\n" in two; SmolLM2's does not).

Transformers' processor gives the same tiles and text with `size={"longest_edge": min(L, M)}`
and `max_image_size={"longest_edge": T}` (tests/test_images_patching.py checks both). With
T = 64, S = 16, M = 256 (the easy-VQA teacher's tiles): 64×64 → one view, 19 tokens;
512×384 → 256×192, 3 rows × 4 cols + global = 13 views, 238 tokens; 1500×900 → 256×154 →
256×192, the same 13 views and 238 tokens (M caps the cost of any large image).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
MAX_SIDE = 4096  # Idefics3's absolute cap on either side after the first resize
MAX_GRID = 6  # <row_r_col_c> markers exist up to 6×6 in Idefics3's token set
IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | Image.Image


class ImageError(ValueError):
    """An image that cannot be used; `position` is its 1-based place in the sample."""

    def __init__(self, position: int, message: str):
        super().__init__(f"image {position}: {message}")
        self.position, self.reason = position, message


@dataclass(frozen=True)
class ImageLimits:
    """Per-sample caps: encoded bytes per image, decoded pixels (w·h) per image, images."""

    max_bytes: int = 5 << 20
    max_pixels: int = 4096 * 4096
    max_images: int = 8

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"image limit {name} must be a positive integer, got {value!r}")


# ---- decoding -------------------------------------------------------------------------------

_MAGIC = [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")]  # fmt: skip


def sniff_format(data: bytes) -> str | None:
    """The container format from the first bytes ("PNG", "JPEG", "WEBP", "GIF", …) or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _is_truncated(data: bytes, fmt: str) -> bool:
    """Whether the container ends early: no PNG IEND, no JPEG EOI, a short WebP RIFF."""
    if fmt == "PNG":
        return b"IEND" not in data[-16:]
    if fmt == "JPEG":
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "WEBP" and len(data) >= 8:
        return len(data) < struct.unpack("<I", data[4:8])[0] + 8
    return False


def _read(src: ImageSource, position: int, limits: ImageLimits) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise ImageError(position, f"no such file: {path}")
        if path.stat().st_size > limits.max_bytes:
            raise ImageError(position, f"{path.stat().st_size} bytes is over the limit of "
                             f"{limits.max_bytes}")  # fmt: skip
        data = path.read_bytes()
    if not data:
        raise ImageError(position, "empty image data")
    if len(data) > limits.max_bytes:
        raise ImageError(position, f"{len(data)} bytes is over the limit of {limits.max_bytes}")
    return data


def _check_pixels(size: tuple[int, int], position: int, limits: ImageLimits) -> None:
    w, h = size
    if w * h > limits.max_pixels:
        raise ImageError(position, f"{w}×{h} = {w * h} pixels is over the limit of "
                         f"{limits.max_pixels}")  # fmt: skip


def _decode(data: bytes, position: int, limits: ImageLimits) -> Image.Image:
    fmt = sniff_format(data)
    if fmt not in FORMATS:
        kind = f"{fmt} images are" if fmt else "this data is"
        raise ImageError(position, f"unsupported image type: {kind} not PNG, JPEG or WebP")
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
        _check_pixels(image.size, position, limits)  # before any pixel is decompressed
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageError(position, f"decompression bomb refused ({e})") from e
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError) as e:
        what = "truncated" if _is_truncated(data, fmt) else "corrupt"
        raise ImageError(position, f"{what} {_NAMES[fmt]} ({e})") from e
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB: transparency over white, 16/32-bit greyscale scaled to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.float64)
        scale = 257.0 if mode.startswith("I;16") or grey.max(initial=0) > 255 else 1.0
        grey = np.clip(np.rint(grey / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(
    src: ImageSource, position: int = 1, limits: ImageLimits | None = None
) -> Image.Image:
    """One image (encoded bytes, a path, or a PIL image) as an upright RGB PIL image."""
    limits = limits or ImageLimits()
    if isinstance(src, Image.Image):
        _check_pixels(src.size, position, limits)
        image = src
    else:
        image = _decode(_read(src, position, limits), position, limits)
    try:
        if image.getexif().get(0x0112, 1) != 1:  # EXIF Orientation; transposing copies
            image = ImageOps.exif_transpose(image)
    except Exception as e:  # a malformed EXIF block
        raise ImageError(position, f"corrupt EXIF orientation ({e})") from e
    return to_rgb(image)


def load_images(
    srcs: Sequence[ImageSource], limits: ImageLimits | None = None
) -> list[Image.Image]:
    """A sample's images, in order (positions 1…n), under `limits`."""
    limits = limits or ImageLimits()
    if len(srcs) > limits.max_images:
        raise ImageError(limits.max_images + 1,
                         f"{len(srcs)} images; at most {limits.max_images} are allowed")  # fmt: skip
    return [load_image(src, i, limits) for i, src in enumerate(srcs, start=1)]


_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,",
                       re.IGNORECASE)  # fmt: skip


def decode_data_url(url: str, position: int = 1, limits: ImageLimits | None = None) -> bytes:
    """The bytes of a `data:image/…;base64,…` URL (PNG, JPEG or WebP)."""
    limits = limits or ImageLimits()
    m = _DATA_URL.match(url)
    if m is None:
        shown = url[:40] + ("…" if len(url) > 40 else "")
        raise ImageError(position, f"expected a data:image/png|jpeg|webp;base64,… URL, got "
                         f"'{shown}' (only data: URLs are accepted)")  # fmt: skip
    mime = (m.group("mime") or "").lower()
    if mime and mime not in {*FORMATS.values(), "image/jpg"}:
        raise ImageError(position, f"unsupported image type '{mime}': send PNG, JPEG or WebP")
    body = url[m.end() :]
    if len(body) > 4 * (limits.max_bytes // 3 + 1) + 4:
        raise ImageError(position, f"about {len(body) * 3 // 4} bytes is over the limit of "
                         f"{limits.max_bytes}")  # fmt: skip
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(position, f"invalid base64 in the data URL ({e})") from e


# ---- adaptive patching ----------------------------------------------------------------------


@dataclass(frozen=True)
class PatchConfig:
    """How images become tiles and prompt tokens (see the module docstring for the rule)."""

    tile_size: int  # T: the vision encoder's input side
    tokens_per_tile: int  # S: <image> placeholders per tile
    longest_edge: int | None = None  # M: None → 4·T
    split: bool = True  # False: every image is one T×T view
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.tile_size <= 0 or self.tokens_per_tile <= 0:
            raise ValueError("tile_size and tokens_per_tile must be positive")
        m, t = self.longest_edge, self.tile_size
        if m is not None and not t <= m <= MAX_GRID * t:
            raise ValueError(f"longest_edge {m} must be in [{t}, {MAX_GRID * t}] (tile side "
                             f"{t}; Idefics3 tokenizers mark grids up to "
                             f"{MAX_GRID}×{MAX_GRID} tiles)")  # fmt: skip

    @property
    def max_side(self) -> int:
        return self.longest_edge or 4 * self.tile_size

    @classmethod
    def from_config(cls, config: dict, preprocessor: dict | None = None) -> PatchConfig:
        """From an Idefics3 `config.json` dict (+ `preprocessor_config.json`, optional)."""
        v, pre = config["vision_config"], preprocessor or {}
        tile, patch, s = v["image_size"], v["patch_size"], config.get("scale_factor", 2)
        longest = (pre.get("size") or {}).get("longest_edge")
        return cls(
            tile_size=tile,
            tokens_per_tile=(tile // patch) ** 2 // s**2,
            longest_edge=min(max(longest, tile), MAX_GRID * tile) if longest else None,
            split=pre.get("do_image_splitting", True),
            mean=tuple(pre.get("image_mean", cls.mean)),
            std=tuple(pre.get("image_std", cls.std)),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> PatchConfig | None:
        """An export's patching, or None for a model without a vision tower."""
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        if "vision_config" not in config:
            return None
        pre_file = model_dir / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else None
        return cls.from_config(config, pre)


def _fit_longest(height: int, width: int, longest: int) -> tuple[int, int]:
    """Idefics3's rescale-to-max-len: the longer side becomes `longest`, the shorter follows
    the aspect ratio (truncated, then rounded up to even); then both capped at MAX_SIDE."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_SIDE:
        width, height = MAX_SIDE, max(int(MAX_SIDE / aspect), 1)
    elif height > width and height > MAX_SIDE:
        height, width = MAX_SIDE, max(int(MAX_SIDE * aspect), 1)
    return height, width


def _whole_tiles(height: int, width: int, tile: int) -> tuple[int, int]:
    """Idefics3's resize-for-vision-encoder: the longer side up to whole tiles, then the
    shorter one from the aspect ratio, up to whole tiles too."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def plan(
    height: int, width: int, config: PatchConfig
) -> tuple[tuple[int, int], tuple[int, int], int, int]:
    """The sizes (height, width) after the first and the second resize, and the grid's rows
    and cols (0, 0: one view)."""
    t = config.tile_size
    first = _fit_longest(height, width, min(max(height, width), config.max_side))
    if not config.split:
        return first, (t, t), 0, 0
    h, w = _whole_tiles(*first, t)
    if h > t or w > t:
        return first, (h, w), h // t, w // t
    return first, (h, w), 0, 0


def image_prompt(rows: int, cols: int, tokens_per_tile: int) -> str:
    """The text that replaces one `<image>` marker (Idefics3's processor writes the same)."""
    view = IMAGE_TOKEN * tokens_per_tile
    glob = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{view}{FAKE_TOKEN}"
    if rows == 0 and cols == 0:
        return glob
    grid = "".join(
        "".join(f"{FAKE_TOKEN}<row_{r}_col_{c}>{view}" for c in range(1, cols + 1)) + "\n"
        for r in range(1, rows + 1)
    )
    return f"{grid}\n{glob}"


def image_token_count(
    rows: int, cols: int, tokens_per_tile: int, split_newlines: bool = False
) -> int:
    """Prompt tokens one image costs (the module docstring's rule). `split_newlines`: the
    tokenizer encodes "\\n\\n" as two tokens."""
    single = tokens_per_tile + 3
    if rows == 0 and cols == 0:
        return single
    return rows * (cols * (tokens_per_tile + 2) + 1) + single + int(split_newlines)


def image_special_tokens(max_grid: int = MAX_GRID) -> list[str]:
    """The tokens a tokenizer needs as special tokens for image prompts (Idefics3's set)."""
    rows = [f"<row_{r}_col_{c}>" for r in range(1, max_grid + 1) for c in range(1, max_grid + 1)]
    return [FAKE_TOKEN, IMAGE_TOKEN, GLOBAL_TOKEN, "<end_of_utterance>", *rows]


@dataclass
class PatchedImage:
    pixel_values: torch.Tensor  # [views, 3, T, T]: the grid row-major, then the global view
    rows: int
    cols: int
    prompt: str  # replaces this image's `<image>` marker

    @property
    def views(self) -> int:
        return self.pixel_values.shape[0]


def _normalize(image: Image.Image, config: PatchConfig) -> np.ndarray:
    """RGB uint8 [H, W, 3] → float32 [3, H, W]: x / 255, then (x − mean) / std."""
    x = np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 255.0
    mean = np.asarray(config.mean, dtype=np.float64)[:, None, None]
    std = np.asarray(config.std, dtype=np.float64)[:, None, None]
    return ((x - mean) / std).astype(np.float32)


def split_image(image: Image.Image, config: PatchConfig) -> PatchedImage:
    """One RGB image → its normalized views and prompt text (LANCZOS resizes, as Idefics3;
    a resize to the same size is a copy)."""
    t = config.tile_size
    first, (h, w), rows, cols = plan(image.height, image.width, config)
    image = image.resize(first[::-1], Image.Resampling.LANCZOS)
    image = image.resize((w, h), Image.Resampling.LANCZOS)
    views = [image.crop((c * t, r * t, (c + 1) * t, (r + 1) * t))
             for r in range(rows) for c in range(cols)]  # fmt: skip
    views.append(image.resize((t, t), Image.Resampling.LANCZOS) if rows else image)
    pixels = torch.from_numpy(np.stack([_normalize(v, config) for v in views]))
    return PatchedImage(pixels, rows, cols, image_prompt(rows, cols, config.tokens_per_tile))


def preprocess(images: Sequence[Image.Image], config: PatchConfig) -> list[PatchedImage]:
    """Each image's views and prompt text; `torch.cat([p.pixel_values for p in …])` is the
    model's pixel_values [views, 3, T, T] in prompt order."""
    return [split_image(im, config) for im in images]


def expand_prompt(text: str, patched: Sequence[PatchedImage]) -> str:
    """`text` with its i-th `<image>` marker replaced by image i's prompt text."""
    parts = text.split(IMAGE_TOKEN)
    if len(parts) - 1 != len(patched):
        raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_TOKEN} markers for "
                         f"{len(patched)} images")  # fmt: skip
    out = [parts[0]]
    for p, rest in zip(patched, parts[1:], strict=True):
        out += [p.prompt, rest]
    return "".join(out)
