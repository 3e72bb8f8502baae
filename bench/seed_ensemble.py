"""Probe for issue 18: how far apart do networks of different seeds score, and what does their sum give?

    python bench/seed_ensemble.py --store fashion.h5 --out runs/ensemble-s012 \
        runs/hsl-default-s0/model runs/hsl-default-s1/model runs/hsl-default-s2/model

Joins K model folders of one config, trained separately (`bench/results.py`, seeds 0..K-1: other
initial weights, batch orders and validation products; the same fixed test split), into one model
folder of `members` K, as `hsl train` does for a config with `members` (hsl/members.py), and scores
it with the stock `hsl.evaluate` as bench/results.py scores a run. OUT/result.json as theirs.
`--index-dim 1024` fits the members' index projection as `hsl train` does for such a config; `--int8`
stores the weights in 8 bits, as the shipped model is; `--last-epoch` joins each folder's last epoch (its
checkpoint) instead of the one its validation picked.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from results import HIERARCHY, QUERIES  # bench/results.py: the same scoring as its rows

from hsl.evaluate import evaluate
from hsl.members import join_members
from hsl.model_files import WEIGHTS_FILE, read_config, write_int8_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--index-dim", type=int, default=0,
                        help="project the joined vectors to this size (config index_dim; 0: side by side)")
    parser.add_argument("--int8", action="store_true",
                        help="store the joined weights in 8 bits, as the shipped model is")
    parser.add_argument("--last-epoch", action="store_true",
                        help="join each folder's last checkpointed epoch instead of its validation-picked one")
    parser.add_argument("models", type=Path, nargs="+", help="model folders of one config")
    args = parser.parse_args()
    if args.last_epoch:
        args.models = [_last_epoch(folder, args.out / "last-epoch" / str(k)) for k, folder in enumerate(args.models)]
    folders = [read_config(folder) for folder in args.models]  # (config, meta), without the weights
    if any(config != folders[0][0] or meta["backbone"] != folders[0][1]["backbone"] for config, meta in folders):
        raise SystemExit("the folders hold models of different configs or backbones")
    config = replace(folders[0][0], members=len(args.models), index_dim=args.index_dim)
    join_members(args.models, args.out / "model", config, {"joined": [str(f) for f in args.models]}, args.store)
    if args.int8:
        write_int8_weights(args.out / "model" / WEIGHTS_FILE, args.out / "model" / WEIGHTS_FILE)
    instance = evaluate(args.store, args.out / "model", hierarchy=HIERARCHY)
    graded = evaluate(args.store, args.out / "model", queries_path=str(QUERIES))
    result = {"config": f"sum of {len(args.models)} seeds", "models": [str(m) for m in args.models],
              **instance["metrics"], **graded["metrics"]}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def _last_epoch(folder: Path, copy: Path) -> Path:
    """A model folder like FOLDER whose weights are those of its checkpoint's last epoch (hsl/checkpoint.py)."""
    copy.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "metrics.json", "train_args.json"):
        shutil.copy(folder / name, copy / name)
    latest = (folder / "checkpoint" / "latest").read_text().strip()
    shutil.copy(folder / "checkpoint" / latest / WEIGHTS_FILE, copy / WEIGHTS_FILE)
    return copy


if __name__ == "__main__":
    main()
