"""Train and score configs over several seeds on one store; print a markdown table of mean ± spread.

Each (config, seed) run trains with `hsl.train.train` (fixed hashed test split of 15% of the
products, validation 10% by seed), then scores the best epoch on the test split: instance
retrieval (each title finds its own photo), graded NDCG@10 on attribute queries, and HP@5 over
the category tree. Finished runs are kept in OUT/NAME-sSEED/result.json and not run again, so
the script resumes after an interruption.

    python bench/results.py --store fashion.h5 --out runs --configs hsl-default dual --seeds 0 1 2
    python bench/results.py --out runs --configs hsl-default dual --seeds 0 1 2 --table-only
    python bench/results.py --store fashion.h5 --out runs --configs hsl-paper --seeds 0 1 2 --device cuda
    python bench/results.py --store fashion.h5 --out runs-fp32 --configs hsl-default --precision fp32
    python bench/results.py --store fashion.h5 --out runs-val --configs hsl-members3 --val-fraction 0.1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from hsl.checkpoint import Checkpoint
from hsl.evaluate import evaluate
from hsl.metrics import current_names
from hsl.train import TrainOptions, train

QUERIES = Path(__file__).resolve().parents[1] / "data" / "queries" / "fashion_attributes.jsonl"
HIERARCHY = ["masterCategory", "subCategory", "articleType"]
COLUMNS = ["R@1", "R@5", "R@10", "MRR@10", "NDCG@5", "gNDCG@10", "HP@5", "acc_image", "acc_text", "train_s"]


def run_one(store: Path, out: Path, config: str, seed: int, epochs: int | None, device: str = "cpu",
            precision: str = "auto", queries: Path | None = QUERIES, val_fraction: float | None = None) -> dict:
    """Train CONFIG with SEED into OUT/model and score it; `queries=None` skips the graded attribute queries.

    `val_fraction` None: the config's (0.1 unless it says); 0 trains on every product outside the test split
    and keeps the last epoch."""
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    model = out / "model"
    # A config of members keeps a checkpoint per member (model/members/k/checkpoint), not model/checkpoint.
    resume = Checkpoint(model / "checkpoint").exists() or (model / "members").is_dir()
    record = train(store, model, TrainOptions(config=config, seed=seed, epochs=epochs, resume=resume,
                                                       device=device, precision=precision,
                                                       val_fraction=val_fraction))
    seconds = time.perf_counter() - started
    instance = evaluate(store, model, hierarchy=HIERARCHY, device=device, precision=precision)
    graded = {"metrics": {}, "queries": 0} if queries is None else evaluate(
        store, model, queries_path=str(queries), device=device, precision=precision)
    result = {"config": config, "seed": seed, "device": device, "precision": instance["precision"],
              "split": record["split"],
              "best_epoch": record["best"]["epoch"],
              "epoch_s": [entry["seconds"] for entry in record["history"]],
              "train_s": round(seconds, 1),
              **instance["metrics"], **graded["metrics"], "test_products": instance["gallery"],
              "attribute_queries": graded["queries"]}
    done.write_text(json.dumps(result, indent=2))
    return result


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| config | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, runs in results.items():
        cells = []
        for column in COLUMNS:
            values = [r[column] for r in map(current_names, runs) if column in r]  # old runs: "MRR"
            if not values:
                cells.append("-")
                continue
            scale = 1 if column == "train_s" else 100  # metrics in points
            mean = statistics.mean(values) * scale
            spread = (statistics.stdev(values) * scale) if len(values) > 1 else 0.0
            cells.append(f"{mean:.0f} ± {spread:.0f}" if column == "train_s" else f"{mean:.1f} ± {spread:.1f}")
        seeds = f"{len(runs)} seed" + ("s" if len(runs) > 1 else "")
        lines.append(f"| {name} ({seeds}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", nargs="+", default=["hsl-default", "dual"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override every config's epochs")
    parser.add_argument("--device", default="cpu", help="torch device for training and scoring, e.g. cuda")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (hsl/precision.py)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="validation share that picks the best epoch (default: the config's); 0 trains on it "
                             "too and keeps the last epoch")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    for config in args.configs:
        for seed in args.seeds:
            run_dir = args.out / f"{Path(config).stem}-s{seed}"
            if args.table_only:
                if (run_dir / "result.json").is_file():
                    results.setdefault(config, []).append(json.loads((run_dir / "result.json").read_text()))
                continue
            result = run_one(args.store, run_dir, config, seed, args.epochs, args.device, args.precision,
                             val_fraction=args.val_fraction)
            results.setdefault(config, []).append(result)
            print(json.dumps(result), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
