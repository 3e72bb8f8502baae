"""Where objects matter: scenes of 2-4 catalog products on one canvas, a query naming one of them.

`build` partitions the catalog's products (seeded shuffle) into scenes of 2 to 4 products, each
photo used in exactly one scene, and composes each scene on a white square canvas: the canvas is
cut into 2 x 2 slots, each product takes a slot of its own (chosen by the seed), scaled to 70-100%
of the slot and shifted inside it, so products never overlap. It writes

    OUT/scenes/{scene_id}.jpg
    OUT/manifest.csv   one row per scene: id, image, title (the catalog title of ONE product of the
                       scene, the target, chosen by the seed), target (its catalog id), its attribute
                       columns, and products (every product id of the scene, space-separated)
    OUT/products.csv   one row per product of a scene: scene_id, slot, id, box (x0 y0 x1 y1 on the
                       canvas), target (1 for the scene's target), title and attributes

`hsl extract OUT/manifest.csv --store scenes.h5` then reads it as any manifest (every column other
than id, image and title is an attribute). `run` trains and scores configs over seeds on such a
store with bench/results.py's `run_one` (instance retrieval: each title must find its own scene;
no graded attribute queries, which are written for the catalog's test split), and prints the table.

    python bench/scenes.py build --catalog ../shared/data/fashion --out /tmp/scenes/data --seed 0
    hsl extract /tmp/scenes/data/manifest.csv --store /tmp/scenes/scenes.h5
    python bench/scenes.py run --store /tmp/scenes/scenes.h5 --out /tmp/scenes/runs \
        --configs hsl-default hsl-image-only hsl-object-only dual --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

ATTRIBUTES = ["gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage"]
SLOTS = 2  # the canvas is SLOTS x SLOTS slots, one product a slot
MIN_SCALE, MAX_SCALE = 0.7, 1.0  # of the slot's side, for the product photo's longer side
TITLE = "productDisplayName"


def scene_sizes(count: int, rng: random.Random) -> list[int]:
    """Sizes 2..4 that add up to `count` (>= 2): seeded draws, never leaving a single product over."""
    if count < 2:
        raise ValueError(f"a scene needs at least 2 products, the catalog has {count}")
    sizes, left = [], count
    while left:
        size = rng.choice([s for s in (2, 3, 4) if s <= left and left - s != 1])
        sizes.append(size)
        left -= size
    return sizes


def read_catalog(catalog: Path, image_template: str) -> list[dict]:
    """The catalog's rows that have a title and a photo, in file order."""
    with open(catalog / "products.csv", newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    kept = []
    for row in rows:
        image = catalog / image_template.format(**row)
        if row.get(TITLE, "").strip() and image.is_file():
            kept.append({**row, "_image": image})
    return kept


def compose(photos: list[Path], canvas: int, rng: random.Random) -> tuple[object, list[tuple[int, ...]]]:
    """One white canvas with each photo in a slot of its own; the photos' boxes (x0, y0, x1, y1)."""
    from PIL import Image

    image = Image.new("RGB", (canvas, canvas), "white")
    slot = canvas // SLOTS
    slots = rng.sample(range(SLOTS * SLOTS), len(photos))
    boxes = []
    for path, where in zip(photos, slots, strict=True):
        with Image.open(path) as source:
            photo = source.convert("RGB")
        side = round(slot * rng.uniform(MIN_SCALE, MAX_SCALE))
        scale = side / max(photo.size)
        w, h = max(1, round(photo.width * scale)), max(1, round(photo.height * scale))
        photo = photo.resize((w, h), Image.Resampling.BICUBIC)
        x0 = (where % SLOTS) * slot + rng.randint(0, slot - w)
        y0 = (where // SLOTS) * slot + rng.randint(0, slot - h)
        image.paste(photo, (x0, y0))
        boxes.append((x0, y0, x0 + w, y0 + h))
    return image, boxes


def build(catalog: Path, out: Path, seed: int = 0, canvas: int = 448, max_scenes: int | None = None,
          image_template: str = "images/{id}.jpg", quality: int = 90) -> dict:
    """Write OUT/scenes/*.jpg, OUT/manifest.csv and OUT/products.csv; return a summary."""
    rng = random.Random(seed)
    products = read_catalog(catalog, image_template)
    rng.shuffle(products)
    sizes = scene_sizes(len(products), rng)
    width = len(str(len(sizes)))  # scene ids do not depend on --max-scenes
    if max_scenes is not None:
        sizes = sizes[:max_scenes]
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    manifest_rows, product_rows, start = [], [], 0
    for number, size in enumerate(sizes):
        members, start = products[start:start + size], start + size
        scene_id = f"scene{number:0{width}d}"
        image, boxes = compose([m["_image"] for m in members], canvas, rng)
        target = rng.randrange(size)
        image.save(out / "scenes" / f"{scene_id}.jpg", quality=quality)
        chosen = members[target]
        manifest_rows.append({"id": scene_id, "image": f"scenes/{scene_id}.jpg", "title": chosen[TITLE].strip(),
                              "target": chosen["id"], **{a: chosen.get(a, "") for a in ATTRIBUTES},
                              "products": " ".join(m["id"] for m in members)})
        for slot, (member, box) in enumerate(zip(members, boxes, strict=True)):
            product_rows.append({"scene_id": scene_id, "slot": slot, "id": member["id"],
                                 "box": " ".join(map(str, box)), "target": int(slot == target),
                                 "title": member[TITLE].strip(), **{a: member.get(a, "") for a in ATTRIBUTES}})
    _write_csv(out / "manifest.csv", manifest_rows)
    _write_csv(out / "products.csv", product_rows)
    return {"scenes": len(manifest_rows), "products": len(product_rows), "catalog_products": len(products),
            "sizes": {str(s): sizes.count(s) for s in (2, 3, 4)}, "canvas": canvas, "seed": seed}


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run(store: Path, out: Path, configs: list[str], seeds: list[int], epochs: int | None, table_only: bool) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results import run_one, table

    results: dict[str, list[dict]] = {}
    for config in configs:
        for seed in seeds:
            run_dir = out / f"{Path(config).stem}-s{seed}"
            if table_only:
                if (run_dir / "result.json").is_file():
                    results.setdefault(config, []).append(json.loads((run_dir / "result.json").read_text()))
                continue
            result = run_one(store, run_dir, config, seed, epochs, queries=None)
            results.setdefault(config, []).append(result)
            print(json.dumps(result), flush=True)
    return table(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="compose the scenes and write their manifest")
    make.add_argument("--catalog", type=Path, required=True, help="folder with products.csv and images/")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--canvas", type=int, default=448, help="side of the square canvas, in pixels")
    make.add_argument("--max-scenes", type=int, default=None)
    score = commands.add_parser("run", help="train and score configs over seeds on a scenes store")
    score.add_argument("--store", type=Path)
    score.add_argument("--out", type=Path, required=True)
    score.add_argument("--configs", nargs="+", default=["hsl-default", "hsl-image-only", "hsl-object-only", "dual"])
    score.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    score.add_argument("--epochs", type=int, default=None, help="override every config's epochs")
    score.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if args.command == "build":
        print(json.dumps(build(args.catalog, args.out, args.seed, args.canvas, args.max_scenes)))
    else:
        print(run(args.store, args.out, args.configs, args.seeds, args.epochs, args.table_only))


if __name__ == "__main__":
    main()
