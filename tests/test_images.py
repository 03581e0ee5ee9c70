"""serve.images decoding: formats, modes, EXIF, several images, limits, bad files (all made here)."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.images import ImageError, ImageLimits, decode_data_url, load_image, load_images


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int = 24, h: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height over a few bytes of data (a bomb's shape)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_lossless_formats_round_trip_from_bytes_and_paths(fmt, tmp_path):
    src = noise()
    data = encode(src, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    for got in (load_image(data), load_image(path), load_image(str(path))):
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(src))


def test_jpeg_and_pil_sources():
    src = Image.new("RGB", (20, 10), (200, 40, 10))
    got = np.asarray(load_image(encode(src, "JPEG", quality=95))).astype(int)
    assert got.shape == (10, 20, 3) and np.abs(got - [200, 40, 10]).max() <= 4
    assert load_image(src) is src  # already upright RGB: nothing to convert


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent → white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black → mid grey
    got = np.asarray(load_image(encode(rgba, "PNG")))
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 2].tolist() == [255, 0, 0]
    assert abs(int(got[0, 1, 0]) - 127) <= 1
    la = Image.new("LA", (2, 2), (0, 0))
    assert np.asarray(load_image(encode(la, "PNG"))).min() == 255
    pal = Image.new("P", (3, 1))
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putpixel((1, 0), 1)
    got = np.asarray(load_image(encode(pal, "PNG")))
    assert got[0, 0].tolist() == [10, 20, 30] and got[0, 1].tolist() == [40, 50, 60]
    pal_t = encode(pal, "PNG", transparency=0)  # palette entry 0 transparent → white
    assert np.asarray(load_image(pal_t))[0, 0].tolist() == [255, 255, 255]
    grey = np.asarray(load_image(encode(Image.new("L", (2, 2), 77), "PNG")))
    assert grey.shape == (2, 2, 3) and (grey == 77).all()
    deep = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert deep.mode == "I;16"
    got = np.asarray(load_image(encode(deep, "PNG")))[0, :, 0]
    assert got.tolist() == [0, 128, 255]  # scaled to 8 bits, not clipped at 255
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    red = np.asarray(load_image(encode(cmyk, "JPEG", quality=95))).astype(int)
    assert np.abs(red - [255, 0, 0]).max() <= 6
    bits = Image.new("1", (3, 3), 1)
    assert (np.asarray(load_image(encode(bits, "PNG"))) == 255).all()


def test_exif_orientation_is_applied():
    src = Image.new("RGB", (40, 20), (0, 0, 0))
    src.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    got = load_image(encode(src, "JPEG", exif=exif.tobytes(), quality=95))
    assert got.size == (20, 40)
    arr = np.asarray(got).astype(int)
    assert arr[:20].mean() > 200 and arr[20:].mean() < 50  # the white half is now on top


def test_several_images_per_sample_and_count_limit():
    images = [encode(noise(seed=i), "PNG") for i in range(3)]
    got = load_images(images)
    assert [np.asarray(g)[0, 0].tolist() for g in got] == [
        np.asarray(noise(seed=i))[0, 0].tolist() for i in range(3)
    ]
    with pytest.raises(ImageError, match=r"3 images; at most 2"):
        load_images(images, ImageLimits(max_images=2))
    bad = bytearray(images[1])
    bad[60:100] = b"\xa5" * 40  # inside IDAT; the file still ends with IEND
    broken = [images[0], bytes(bad), images[2]]
    with pytest.raises(ImageError, match=r"^image 2: corrupt PNG") as err:
        load_images(broken)
    assert err.value.position == 2


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_file_names_format_and_position(fmt):
    data = encode(noise(64, 48), fmt)
    name = {"WEBP": "WebP"}.get(fmt, fmt)
    with pytest.raises(ImageError, match=rf"^image 3: truncated {name} \("):
        load_image(data[: len(data) // 2], position=3)


def test_unsupported_and_empty():
    with pytest.raises(ImageError, match="unsupported image type: GIF images are not PNG"):
        load_image(encode(noise(), "GIF"))
    with pytest.raises(ImageError, match="unsupported image type: this data is not"):
        load_image(b"hello, not an image")
    with pytest.raises(ImageError, match="empty image data"):
        load_image(b"")
    with pytest.raises(ImageError, match="no such file"):
        load_image("/nonexistent/x.png")


def test_bombs_are_refused_before_decoding():
    with pytest.raises(ImageError, match=r"^image 1: decompression bomb refused"):
        load_image(png_header_only(50_000, 50_000))  # Pillow's own guard (2.5 G pixels)
    with pytest.raises(
        ImageError, match=r"3000×3000 = 9000000 pixels is over the limit of 1000000"
    ):
        load_image(png_header_only(3000, 3000), limits=ImageLimits(max_pixels=1_000_000))
    big = Image.new("RGB", (2000, 1000))
    with pytest.raises(ImageError, match="pixels is over the limit"):
        load_image(big, limits=ImageLimits(max_pixels=1_000_000))
    data = encode(noise(), "PNG")
    with pytest.raises(ImageError, match=rf"{len(data)} bytes is over the limit of 100"):
        load_image(data, limits=ImageLimits(max_bytes=100))


def test_data_urls():
    data = encode(noise(), "PNG")
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert decode_data_url(url) == data
    assert decode_data_url(url.replace("image/png", "image/jpeg")) == data  # type sniffed later
    with pytest.raises(ImageError, match="^image 2: invalid base64"):
        decode_data_url("data:image/png;base64,abc*def", position=2)
    with pytest.raises(ImageError, match="unsupported image type 'image/gif'"):
        decode_data_url("data:image/gif;base64,R0lGODlh")
    with pytest.raises(ImageError, match="only data: URLs are accepted"):
        decode_data_url("https://example.com/cat.png")
    with pytest.raises(ImageError, match="bytes is over the limit of 10$"):
        decode_data_url(url, limits=ImageLimits(max_bytes=10))


def test_one_image_decoder_in_the_project():
    """distill/, eval/ and serve/ open images only through serve/images.py (no second copy)."""
    root = Path(__file__).resolve().parents[1]
    decoders = re.compile(r"Image\.open\(|exif_transpose\(|Image\.MAX_IMAGE_PIXELS")
    offenders = [str(p.relative_to(root)) for pkg in ("distill", "eval", "serve")
                 for p in sorted((root / pkg).rglob("*.py"))
                 if p != root / "serve" / "images.py" and decoders.search(p.read_text())]  # fmt: skip
    assert offenders == []
