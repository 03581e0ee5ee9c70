"""Image input cost per image: decode (encoded bytes → upright RGB, serve.images.load_image)
and preprocessing (Idefics3 tiling → normalized pixel tensors + prompt text,
serve.images.split_image) at 64×64, 512×384 and 1500×900, for PNG, JPEG and WebP. Prints a
table, writes JSON.

    python bench/images.py            # → bench/results/images.json

The test image is synthetic but photo-like (smooth colour gradients, a few shapes, mild
noise), so the encoders compress it as they would a photo rather than noise. Each cell is the
median of `--repeats` runs (fewer for the largest size) after one warm-up, on one thread.
Tiling uses two configs: the easy-VQA teacher's (64-pixel tiles, 16 tokens a tile, longest
edge 256) and SmolVLM's (512-pixel tiles, 64 tokens a tile, longest edge 2048).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from provenance import provenance  # bench/provenance.py (the script's own directory)

from serve.images import PatchConfig, image_token_count, load_image, split_image

SIZES = [(64, 64), (512, 384), (1500, 900)]
FORMATS = {"PNG": {}, "JPEG": {"quality": 90}, "WEBP": {"quality": 90}}
CONFIGS = {
    "easy-vqa (T=64, S=16, M=256)": PatchConfig(tile_size=64, tokens_per_tile=16, longest_edge=256),
    "smolvlm (T=512, S=64, M=2048)": PatchConfig(512, 64, longest_edge=2048),
}


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([0.6 + 0.4 * np.sin(6 * x), 0.5 + 0.4 * np.cos(5 * y), 0.5 + 0.3 * x * y], -1)
    rgb = rgb * 255 + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(max(2, width // 20), max(3, width // 5)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=fill)
    return image


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(repeats: int) -> list[dict]:
    rows = []
    for w, h in SIZES:
        image = photo_like(w, h)
        n = repeats if w * h < 1_000_000 else max(3, repeats // 4)
        for fmt, options in FORMATS.items():
            buf = io.BytesIO()
            image.save(buf, fmt, **options)
            data = buf.getvalue()
            rgb = load_image(data)
            row = {"size": f"{w}x{h}", "format": fmt, "bytes": len(data), "repeats": n,
                   "decode_ms": round(median_ms(lambda d=data: load_image(d), n), 3),
                   "tiling": {}}  # fmt: skip
            for name, cfg in CONFIGS.items():
                patched = split_image(rgb, cfg)
                row["tiling"][name] = {
                    "views": patched.views,
                    "grid": [patched.rows, patched.cols],
                    "tokens": image_token_count(patched.rows, patched.cols, cfg.tokens_per_tile),
                    "preprocess_ms": round(median_ms(lambda r=rgb, c=cfg: split_image(r, c), n), 3),
                }
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    names = list(CONFIGS)
    head = ["image", "format", "bytes", "decode ms"]
    head += [f"{n.split()[0]} {col}" for n in names for col in ("views", "tokens", "prep ms")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["size"], r["format"], f"{r['bytes']:,}", f"{r['decode_ms']:.2f}"]
        for n in names:
            t = r["tiling"][n]
            cells += [str(t["views"]), str(t["tokens"]), f"{t['preprocess_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "images.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = run(args.repeats)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"rows": rows, "provenance": provenance(("pillow",))}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
