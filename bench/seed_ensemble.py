"""Probe for issue 18: how far apart do networks of different seeds score, and what does their sum give?

    python bench/seed_ensemble.py --store fashion.h5 --out runs/ensemble-s012 \
        runs/hsl-default-s0/model runs/hsl-default-s1/model runs/hsl-default-s2/model

Joins K model folders of one config, trained separately (`bench/results.py`, seeds 0..K-1: other
initial weights, batch orders and validation products; the same fixed test split), into one model
folder of `members` K (hsl/model.py): the first folder's weights as they are, the others under
`other_members.k.`. Its score is the sum of theirs, so the stock `hsl.evaluate` scores it as
bench/results.py scores a run, and `hsl query --model` searches with it. OUT/result.json as theirs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from results import HIERARCHY, QUERIES  # bench/results.py: the same scoring as its rows
from safetensors.torch import load_file

from hsl.evaluate import evaluate
from hsl.factory import load_model, save_model
from hsl.model import HSLModel


def join(folders: list[Path], out: Path) -> None:
    models = [load_model(folder) for folder in folders]
    first, meta = models[0]
    if any(m.config != first.config or other["backbone"] != meta["backbone"] for m, other in models[1:]):
        raise SystemExit("the folders hold models of different configs or backbones")
    joined = HSLModel(replace(first.config, members=len(models)), first.image_dim, first.text_dim)
    state = dict(load_file(str(folders[0] / "model.safetensors")))
    for k, folder in enumerate(folders[1:]):
        state.update({f"other_members.{k}.{key}": value
                      for key, value in load_file(str(folder / "model.safetensors")).items()})
    joined.load_state_dict(state)
    save_model(joined, out / "model", {**meta, "joined": [str(f) for f in folders]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("models", type=Path, nargs="+", help="model folders of one config")
    args = parser.parse_args()
    join(args.models, args.out)
    instance = evaluate(args.store, args.out / "model", hierarchy=HIERARCHY)
    graded = evaluate(args.store, args.out / "model", queries_path=str(QUERIES))
    result = {"config": f"sum of {len(args.models)} seeds", "models": [str(m) for m in args.models],
              **instance["metrics"], **graded["metrics"]}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
