"""Extraction throughput: the bare backbone forward vs the whole `hsl extract` pipeline.

Both run in one process on the same photos of the real catalog. The bare forward gets photos
already decoded in memory and only runs the image and text encoders (batch 32); the pipeline is
`hsl.extract.extract` from the manifest to a fresh store (listing, decoding in worker processes,
forward, HDF5 writes). Run: `python bench/extract.py [--n 1024] [--backbone minilm-effnet]`.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hsl.backbones import create_backbone
from hsl.extract import ExtractOptions, default_workers, extract
from hsl.images import load_image
from hsl_data.sources import Columns

FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion"


def bare_forward(spec: str, paths: list[str], texts: list[str], batch: int) -> float:
    backbone = create_backbone(spec)
    pixels = torch.from_numpy(np.stack([load_image(p, backbone.image_size) for p in paths]))
    backbone.encode_images(pixels[:batch])  # warm-up: first-call allocations are not throughput
    backbone.encode_texts(texts[:batch])
    started = time.perf_counter()
    for i in range(0, len(paths), batch):
        backbone.encode_images(pixels[i:i + batch])
        backbone.encode_texts(texts[i:i + batch])
    return len(paths) / (time.perf_counter() - started)


def pipeline(spec: str, manifest: Path, n: int, batch: int, workers: int) -> tuple[float, float]:
    """(steady images/s between the first and last batch, end-to-end images/s incl. model load)."""
    stamps: list[tuple[float, int]] = []
    options = ExtractOptions(backbone=spec, batch_size=batch, workers=workers, limit=n,
                             columns=Columns(text="productDisplayName", image_template="images/{id}.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        report = extract(manifest, Path(tmp) / "bench.h5", options,
                         progress=lambda done, total: stamps.append((time.perf_counter(), done)))
        total = time.perf_counter() - started
    (t0, d0), (t1, d1) = stamps[1], stamps[-1]  # from the first finished batch: no start-up cost
    return (d1 - d0) / (t1 - t0), report.extracted / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--backbone", default="minilm-effnet")
    args = parser.parse_args()
    manifest = FASHION / "products.csv"
    if not manifest.is_file():
        raise SystemExit(f"the real catalog is not at {FASHION}; this benchmark needs it")
    with open(manifest, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[: args.n]
    paths = [str(FASHION / "images" / f"{r['id']}.jpg") for r in rows]
    texts = [r["productDisplayName"] for r in rows]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; backbone {args.backbone}; {len(paths)} photos, batch {args.batch_size}, "
          f"{args.workers} decode workers")
    bare = bare_forward(args.backbone, paths, texts, args.batch_size)
    print(f"bare forward (image+text, decoded in memory): {bare:7.1f} images/s")
    steady, end_to_end = pipeline(args.backbone, manifest, len(paths), args.batch_size, args.workers)
    print(f"hsl extract pipeline, steady state:            {steady:7.1f} images/s  ratio {steady / bare:.2f}")
    print(f"hsl extract pipeline, end to end (model load): {end_to_end:7.1f} images/s  ratio {end_to_end / bare:.2f}")


if __name__ == "__main__":
    main()
