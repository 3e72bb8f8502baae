"""Extraction throughput: the bare backbone forward in every precision and layout vs the `hsl extract` pipeline.

The bare forward gets photos already decoded in memory and only runs the image and text encoders
(batch 32), once per (precision, layout): float32 and bfloat16 autocast, NCHW and channels_last.
The pipeline is `hsl.extract.extract` from the manifest to a fresh store (listing, decoding in
worker processes, forward, HDF5 writes) with the default precision (`auto`) and with float32. Its
ratio is taken against the fastest bare forward, so the reference moves up with the code. Every
measurement runs in its own process (a fresh allocator and oneDNN cache, as a user's command has),
`--repeat` times; the table shows the median and the best.

    python bench/extract.py [--n 512] [--repeat 3] [--backbone minilm-effnet] [--device cuda] [--catalog DIR]

On a GPU (`--device cuda`) the precisions are float32, bfloat16 and float16 autocast; bench/gpu.sh runs
it there with the rest of the GPU measurements.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hsl.backbones import create_backbone
from hsl.devices import resolve_device
from hsl.extract import ExtractOptions, default_workers, extract
from hsl.images import load_image
from hsl.precision import Precision, resolve_precision
from hsl_data.sources import Columns

FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion"
LAYOUTS = {"nchw": False, "channels_last": True}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA runs asynchronously: the clock must wait for the work
        torch.cuda.synchronize(device)


def bare_forward(spec: str, paths: list[str], texts: list[str], batch: int, precision: Precision,
                 device: torch.device) -> float:
    backbone = create_backbone(spec).to(device).use_precision(precision)
    pixels = torch.from_numpy(np.stack([load_image(p, backbone.image_size) for p in paths]))
    for _ in range(3 if device.type == "cuda" else 1):  # warm-up: first-call allocations, cuDNN's choice of kernels
        backbone.encode_images(pixels[:batch].to(device))
        backbone.encode_texts(texts[:batch])
    _sync(device)
    started = time.perf_counter()
    for i in range(0, len(paths), batch):
        backbone.encode_images(pixels[i:i + batch].to(device, non_blocking=True))
        backbone.encode_texts(texts[i:i + batch])
    _sync(device)
    return len(paths) / (time.perf_counter() - started)


def pipeline(spec: str, manifest: Path, n: int, batch: int, workers: int, precision: str,
             device: str) -> tuple[float, float]:
    """(steady images/s between the first and last batch, end-to-end images/s incl. model load)."""
    stamps: list[tuple[float, int]] = []
    options = ExtractOptions(backbone=spec, batch_size=batch, workers=workers, limit=n, precision=precision,
                             device=device,
                             columns=Columns(text="productDisplayName", image_template="images/{id}.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        report = extract(manifest, Path(tmp) / "bench.h5", options,
                         progress=lambda done, total: stamps.append((time.perf_counter(), done)))
        total = time.perf_counter() - started
    (t0, d0), (t1, d1) = stamps[1], stamps[-1]  # from the first finished batch: no start-up cost
    return (d1 - d0) / (t1 - t0), report.extracted / total


def _one(args: argparse.Namespace, manifest: Path) -> dict:
    """The measurement `--one KIND:PRECISION[:LAYOUT]` asks for, in this process."""
    kind, precision, *layout = args.one.split(":")
    with open(manifest, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[: args.n]
    if kind == "bare":
        device = resolve_device(args.device)
        chosen = Precision(resolve_precision(precision, device).name, device.type, channels_last=LAYOUTS[layout[0]])
        paths = [str(manifest.parent / "images" / f"{r['id']}.jpg") for r in rows]
        return {"rate": bare_forward(args.backbone, paths, [r["productDisplayName"] for r in rows],
                                     args.batch_size, chosen, device)}
    steady, end_to_end = pipeline(args.backbone, manifest, len(rows), args.batch_size, args.workers, precision,
                                  args.device)
    return {"steady": steady, "end_to_end": end_to_end}


def _measure(args: argparse.Namespace, what: str) -> list[dict]:
    command = [sys.executable, __file__, "--one", what, "--n", str(args.n), "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--backbone", args.backbone, "--device", args.device,
               "--catalog", str(args.catalog)]
    runs = []
    for _ in range(args.repeat):
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} (best {max(values):6.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--backbone", default="minilm-effnet")
    parser.add_argument("--repeat", type=int, default=3, help="processes per measurement")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--catalog", type=Path, default=FASHION, help="a folder with products.csv and images/")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, printed as JSON
    args = parser.parse_args()
    manifest = args.catalog / "products.csv"
    if not manifest.is_file():
        raise SystemExit(f"the real catalog is not at {args.catalog}; this benchmark needs it")
    if args.one:
        print(json.dumps(_one(args, manifest)))
        return
    device = resolve_device(args.device)
    auto = resolve_precision("auto", device).name
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, auto precision on {where}: {auto}; backbone {args.backbone}; "
          f"{args.n} photos, batch {args.batch_size}, {args.workers} decode workers; median of {args.repeat} processes")
    print("bare forward (image+text, photos decoded in memory), images/s:")
    print(f"  {'precision':<10}" + "".join(f"{layout:>26}" for layout in LAYOUTS))
    bare: dict[tuple[str, str], float] = {}
    for precision in ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16"):
        cells = []
        for layout in LAYOUTS:
            rates = [run["rate"] for run in _measure(args, f"bare:{precision}:{layout}")]
            bare[precision, layout] = statistics.median(rates)
            cells.append(_cell(rates))
        print(f"  {precision:<10}" + "".join(f"{cell:>26}" for cell in cells), flush=True)
    (best_precision, best_layout), fastest = max(bare.items(), key=lambda item: item[1])
    print(f"fastest bare forward: {best_precision} {best_layout}, {fastest:.1f} images/s (the pipeline's reference)")
    for precision in ("auto", "fp32"):
        runs = _measure(args, f"pipeline:{precision}")
        steady, end_to_end = [r["steady"] for r in runs], [r["end_to_end"] for r in runs]
        label = f"hsl extract --precision {precision}" + (f" (= {auto})" if precision == "auto" else "")
        ratios = statistics.median(steady) / fastest, statistics.median(end_to_end) / fastest
        print(f"{label}: steady {_cell(steady)} images/s, ratio {ratios[0]:.2f}; "
              f"end to end (model load) {_cell(end_to_end)} images/s, ratio {ratios[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
