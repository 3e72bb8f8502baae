"""bench/scenes.py: composed scenes of several catalog photos, built from a tiny synthetic catalog."""

from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SPEC = importlib.util.spec_from_file_location("scenes", Path(__file__).resolve().parents[1] / "bench" / "scenes.py")
scenes = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(scenes)

COLOURS = ["Red", "Blue", "Green", "Black", "White", "Pink"]


def _catalog(root: Path, count: int) -> Path:
    """`count` products, each a small PNG of one flat colour and a size of its own, with a title and attributes."""
    (root / "images").mkdir(parents=True)
    rows = []
    for n in range(count):
        size = (20 + 7 * (n % 5), 30 + 5 * (n % 4))
        Image.new("RGB", size, (40 * (n % 6), 25 * (n % 10), 200 - 10 * n)).save(root / "images" / f"{100 + n}.png")
        rows.append({"id": str(100 + n), "gender": "Women" if n % 2 else "Men", "masterCategory": "Apparel",
                     "subCategory": "Topwear", "articleType": "Shirts", "baseColour": COLOURS[n % 6],
                     "season": "Summer", "usage": "Casual", "productDisplayName": f"Brand {COLOURS[n % 6]} Shirt {n}"})
    with open(root / "products.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("count", [2, 5, 13])
def test_scene_sizes_add_up_and_stay_in_range(count):
    sizes = scenes.scene_sizes(count, random.Random(count))
    assert sum(sizes) == count and all(2 <= s <= 4 for s in sizes)


def test_scenes_are_seeded_use_each_photo_once_and_name_one_of_their_products(tmp_path):
    catalog = _catalog(tmp_path / "catalog", 17)
    build = dict(image_template="images/{id}.png", canvas=96)
    first = scenes.build(catalog, tmp_path / "a", seed=3, **build)
    again = scenes.build(catalog, tmp_path / "b", seed=3, **build)
    other = scenes.build(catalog, tmp_path / "c", seed=4, **build)

    manifest, products = _read(tmp_path / "a" / "manifest.csv"), _read(tmp_path / "a" / "products.csv")
    # same seed: the same manifest, the same product table and the same pixels
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()
    assert (tmp_path / "a" / "products.csv").read_bytes() == (tmp_path / "b" / "products.csv").read_bytes()
    for row in manifest:
        assert (tmp_path / "a" / row["image"]).read_bytes() == (tmp_path / "b" / row["image"]).read_bytes()
    assert (tmp_path / "a" / "products.csv").read_bytes() != (tmp_path / "c" / "products.csv").read_bytes()
    assert first == again and first["scenes"] == len(manifest) and other["products"] == 17

    # every catalog photo in exactly one scene; 2 to 4 products a scene
    assert sorted(p["id"] for p in products) == [str(100 + n) for n in range(17)]
    titles = {str(100 + n): f"Brand {COLOURS[n % 6]} Shirt {n}" for n in range(17)}
    for row in manifest:
        members = [p for p in products if p["scene_id"] == row["id"]]
        assert 2 <= len(members) <= 4
        assert row["products"].split() == [p["id"] for p in members]
        # the query is the catalog title of one product of the scene, with that product's attributes
        (target,) = [p for p in members if p["target"] == "1"]
        assert row["target"] == target["id"] and row["title"] == titles[target["id"]]
        assert row["title"] in {titles[p["id"]] for p in members}
        assert row["baseColour"] == COLOURS[(int(target["id"]) - 100) % 6]
        # the canvas, and each product's box on it: inside, its own colour there, boxes never overlapping
        pixels = np.asarray(Image.open(tmp_path / "a" / row["image"]))
        assert pixels.shape == (96, 96, 3)
        boxes = [tuple(map(int, p["box"].split())) for p in members]
        for n, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            assert pixels[(y0 + y1) // 2, (x0 + x1) // 2].mean() < 250  # a photo there, not the white canvas
            for a0, b0, a1, b1 in boxes[n + 1:]:
                assert x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0


def test_max_scenes_keeps_the_first_scenes(tmp_path):
    catalog = _catalog(tmp_path / "catalog", 12)
    full = scenes.build(catalog, tmp_path / "full", seed=0, image_template="images/{id}.png", canvas=64)
    short = scenes.build(catalog, tmp_path / "short", seed=0, image_template="images/{id}.png", canvas=64,
                         max_scenes=2)
    assert short["scenes"] == 2 < full["scenes"]
    assert _read(tmp_path / "short" / "manifest.csv") == _read(tmp_path / "full" / "manifest.csv")[:2]
