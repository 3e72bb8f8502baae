"""Train the model that ships inside the package (hsl/models/default) on the whole real catalog.

    python scripts/train_default_model.py --store fashion.h5 [--work /tmp/hsl-default-model]

The store is `hsl extract ../shared/data/fashion/products.csv --store fashion.h5 --text-column
productDisplayName --image-template 'images/{id}.jpg'` (default backbone). Every product is used
for training (--test-fraction 0 --val-fraction 0: the last epoch of each member is kept). The config
is hsl-members3 (three networks and their index projection, docs/results.md); its matrices are stored
in 8 bits with a scale a row (hsl/model_files.py: int8_weights), the rest in float16, to stay under
the 20 MB package budget (they load back as float32).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from hsl.model_files import write_int8_weights
from hsl.train import TrainOptions, train

TARGET = Path(__file__).resolve().parents[1] / "hsl" / "models" / "default"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hsl-default-model"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="hsl-members3")
    args = parser.parse_args()
    resume = args.work.is_dir() and any(args.work.iterdir())  # a killed run continues (members: per member)
    options = TrainOptions(config=args.config, val_fraction=0.0, test_fraction=0.0, seed=args.seed, resume=resume)
    record = train(args.store, args.work, options)
    TARGET.mkdir(parents=True, exist_ok=True)
    write_int8_weights(args.work / "model.safetensors", TARGET / "model.safetensors")
    shutil.copy(args.work / "config.json", TARGET / "config.json")
    (TARGET / "training.json").write_text(json.dumps({
        "command": f"python scripts/train_default_model.py --store {args.store.name} --seed {args.seed} "
                   f"--config {args.config}",
        "epochs": record["best"]["epoch"], "history": record["history"], "split": record["split"]}, indent=2))
    print(f"{TARGET}: {(TARGET / 'model.safetensors').stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
