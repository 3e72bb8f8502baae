"""Photo decoding: every bad kind gets its reason; odd but valid photos decode correctly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hsl.images import BadItem, load_image


def _half_red_half_blue(width: int = 40, height: int = 20) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)  # left half red
    pixels[:, width // 2:] = (0, 0, 255)  # right half blue
    return Image.fromarray(pixels)


def _write_bad(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a photo\n")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path, quality=95)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bomb":
        path = tmp_path / "bomb.png"
        Image.new("L", (3000, 3000)).save(path)  # 9 Mpx, a few KB on disk
    return path


@pytest.mark.parametrize("kind, reason", [("empty", "empty_file"), ("text", "not_an_image"),
                                          ("truncated", "truncated"), ("bomb", "too_many_pixels")])
def test_bad_photos_get_their_reason(tmp_path: Path, kind: str, reason: str) -> None:
    with pytest.raises(BadItem) as caught:
        load_image(str(_write_bad(tmp_path, kind)), 32, max_pixels=1_000_000)
    assert caught.value.reason == reason


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadItem, match="missing_file"):
        load_image(str(tmp_path / "nope.jpg"), 32)


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, display rotated 90 degrees clockwise
    _half_red_half_blue().save(path, exif=exif, quality=100)
    out = load_image(str(path), 40)
    # Rotated clockwise, the red left half ends on top and the blue half at the bottom.
    assert out[8, 20, 0] > 200 and out[8, 20, 2] < 60
    assert out[31, 20, 2] > 200 and out[31, 20, 0] < 60


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "alpha.png"
    pixels = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    pixels[:5, :, :] = (0, 255, 0, 255)  # opaque green top half
    Image.fromarray(pixels, "RGBA").save(path)
    out = load_image(str(path), 10)
    assert tuple(out[8, 5]) == (255, 255, 255)
    assert out[1, 5, 1] > 240 and out[1, 5, 0] < 15


def test_sixteen_bit_png_keeps_its_range(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    ramp = np.tile(np.linspace(0, 65535, 16, dtype=np.uint16), (16, 1))
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_image(str(path), 16).astype(int)
    assert out[:, 0].max() < 20 and out[:, -1].min() > 235  # a full ramp, not clipped to white
    assert abs(out.mean() - 127.5) < 12


@pytest.mark.parametrize("mode", ["L", "CMYK", "P"])
def test_other_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"photo_{mode}.{'png' if mode == 'P' else 'jpg'}"
    _half_red_half_blue().convert(mode).save(path)
    out = load_image(str(path), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_letterbox_keeps_the_whole_tall_photo(tmp_path: Path) -> None:
    path = tmp_path / "tall.png"
    Image.new("RGB", (10, 40), (0, 0, 0)).save(path)
    out = load_image(str(path), 40)
    assert tuple(out[20, 1]) == (255, 255, 255)  # padding at the sides
    assert tuple(out[0, 20]) == (0, 0, 0) and tuple(out[39, 20]) == (0, 0, 0)  # top and bottom kept
