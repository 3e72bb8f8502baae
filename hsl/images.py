"""Decode one product photo safely into a fixed-size RGB array.

Runs inside extraction worker processes, so it only uses PIL and numpy. Every way a photo can
be bad ends in `BadItem` with a short machine-readable reason, never in a crash of the run.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .options import DEFAULT_MAX_PIXELS

# A truncated file must be reported, not padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False



class BadItem(Exception):
    """One item that cannot be extracted; `reason` is a short key used in summaries."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency goes on white (product photos are shot on white)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: PIL's convert("L") clips at 255, so scale the range down instead.
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _letterbox(im: Image.Image, size: int) -> Image.Image:
    """Pad to a white square, then resize: keeps the whole product, unlike a centre crop."""
    w, h = im.size
    side = max(w, h)
    if w != h:
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(im, ((side - w) // 2, (side - h) // 2))
        im = canvas
    return im.resize((size, size), Image.Resampling.BICUBIC)


def load_image(path: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read `path` and return uint8 [size, size, 3]; raise BadItem with the reason otherwise."""
    try:
        if os.path.getsize(path) == 0:
            raise BadItem("empty_file", "the file has 0 bytes")
    except FileNotFoundError as exc:
        raise BadItem("missing_file", "no such file") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise BadItem("too_many_pixels", f"{w}x{h} is over the limit of {max_pixels} pixels")
                im.seek(0)  # animated GIF/WebP: the first frame is the product photo
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
    except BadItem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadItem("too_many_pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise BadItem("not_an_image", "not a readable image format") from exc
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "unreadable"
        raise BadItem(reason, str(exc)) from exc
    except (ValueError, SyntaxError, MemoryError) as exc:
        raise BadItem("unreadable", f"{type(exc).__name__}: {exc}") from exc
    if min(rgb.size) < 1:
        raise BadItem("unreadable", f"image has size {rgb.size}")
    return np.asarray(_letterbox(rgb, size), dtype=np.uint8)
