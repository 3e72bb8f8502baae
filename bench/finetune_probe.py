"""Probe for issue 18: does fine-tuning EfficientNet-Lite0's last stage (from activations cached once) beat
frozen features? Not a user path yet: it measures the lever before the store and `hsl train` carry it.

    python bench/finetune_probe.py cache --store fashion.h5 --out act6.npy --cut 6
    python bench/finetune_probe.py train --store fashion.h5 --acts act6.npy --cut 6 --seed 0 --out runs/ft6-s0

`cache` runs the frozen backbone up to blocks[cut] once per store row (the photo is read again from the
path the store recorded) and keeps that activation (float16; [N,192,7,7] for cut 6, 18.8 kB a photo).
`--text-columns gender baseColour usage articleType --epochs 20` adds the other levers of `hsl train`.
`train` trains a copy of blocks[cut:] + the head convolution (BatchNorm already folded) together with
the hsl-default heads, as `hsl train` does (Adam 2e-4 for the heads, `--stage-lr` for the stage, step
decay 0.9, clip 2.0, batch 256, duplicate titles masked, 10 epochs, best epoch by validation R@10,
the same hashed split), then writes the adapted whole-image vector and 4x4 cells of every row into a
copy of the store with the model beside it, and scores them with the stock `hsl.evaluate.evaluate`,
as bench/results.py does. The result goes to OUT/result.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from results import HIERARCHY, QUERIES  # bench/results.py: the same scoring as its rows

from hsl.attribute_texts import AttributeTexts
from hsl.backbones import MiniLMEffNet
from hsl.dataset import Split, load_products
from hsl.evaluate import evaluate
from hsl.factory import create_model, model_config, save_model
from hsl.images import load_image
from hsl.loss_batch import LossBatch
from hsl.losses import HSLLoss
from hsl.precision import resolve_precision
from hsl.store import FeatureStore
from hsl.train import validate

CPU = torch.device("cpu")


def cache(store_path: Path, out: Path, cut: int) -> None:
    backbone = MiniLMEffNet().use_precision(resolve_precision("auto", CPU))
    tower = backbone.image_tower
    with FeatureStore.open(store_path) as store:
        paths = store.strings("images")
    acts, started = None, time.perf_counter()
    for start in range(0, len(paths), 32):
        pixels = torch.from_numpy(np.stack([load_image(p, backbone.image_size) for p in paths[start:start + 32]]))
        with torch.inference_mode(), backbone.precision.autocast():
            x = tower.bn1(tower.conv_stem(backbone._normalise(pixels)))
            for block in tower.blocks[:cut]:
                x = block(x)
        x = x.float().numpy().astype(np.float16)
        if acts is None:
            acts = np.lib.format.open_memmap(out, mode="w+", dtype=np.float16, shape=(len(paths), *x.shape[1:]))
        acts[start:start + len(x)] = x
    acts.flush()
    print(f"{out}: {acts.shape} in {time.perf_counter() - started:.1f} s")


class Adapted:
    """The fine-tuned last stage: cached activations -> (whole-image vector first, then the 4x4 cells)."""

    def __init__(self, cut: int) -> None:
        tower = MiniLMEffNet().image_tower
        self.stage = torch.nn.Sequential(*tower.blocks[cut:], tower.conv_head, tower.bn2)

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        fmap = self.stage(acts.float()).float()  # [B,1280,7,7]
        cells = F.adaptive_avg_pool2d(fmap, 4).flatten(2).transpose(1, 2)  # [B,16,1280]
        return torch.cat([fmap.mean(dim=(2, 3))[:, None], cells], 1)  # [B,17,1280]


def train(store_path: Path, acts_path: Path, cut: int, seed: int, out: Path, stage_lr: float, epochs: int,
          text_columns: list[str], text_weight: float = 0.5) -> None:
    out.mkdir(parents=True, exist_ok=True)
    acts = torch.from_numpy(np.load(acts_path))  # [N,C,h,w] by store row
    adapted = Adapted(cut)
    config = model_config("hsl-default")
    with FeatureStore.open(store_path) as store:
        products = load_products(store, require_text=True, region_grid=4)
        meta = dict(store.meta)
    if len(products) != len(acts):
        raise SystemExit(f"{acts_path} has {len(acts)} rows, the store {len(products)} products with titles")
    parts = Split(0.15, 0.1, seed).indices(products.ids)
    torch.manual_seed(seed)
    model = create_model(config, meta["image_dim"], meta["text_dim"])
    loss_fn = HSLLoss(config.level_weights, config.granularities, config.logit_scale)
    params = [*model.parameters(), *adapted.stage.parameters()]
    optimizer = torch.optim.Adam([{"params": model.parameters(), "lr": config.training["lr"]},
                                  {"params": adapted.stage.parameters(), "lr": stage_lr}])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, config.training["lr_decay"])
    rows = torch.from_numpy(parts["train"])
    train_set, val = products.subset(parts["train"]), products.subset(parts["val"])
    keys = train_set.title_keys()
    texts = AttributeTexts(train_set.attributes, text_columns, meta["backbone"], meta["max_text_tokens"]) \
        if text_columns else None  # as `hsl train` with training.text_columns (hsl/attribute_texts.py)
    best, history = None, []
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train(), adapted.stage.train()
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        torch.manual_seed(seed * 100_003 + epoch + 1)
        draws = torch.Generator().manual_seed(seed * 100_003 + epoch + 7)
        losses = []
        for batch in order.split(config.training["batch_size"]):
            if len(batch) < 2:
                continue
            regions = adapted(acts[rows[batch]])
            image = model.encode_image(regions, torch.ones(regions.shape[:2], dtype=torch.bool))
            text = model.encode_text(*train_set.text_batch(batch, CPU))
            loss = loss_fn(LossBatch(keys[batch], model.similarities(text, image)))
            if texts:
                tokens, mask, negatives = texts.draw(batch, draws)
                shopper = model.encode_text(tokens, mask)
                loss = loss + text_weight * loss_fn(LossBatch(keys[batch], model.similarities(shopper, image),
                                                              false_negatives=negatives))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.training["grad_clip"])
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
        model.eval(), adapted.stage.eval()
        with torch.no_grad():
            val.regions = torch.cat([adapted(acts[torch.from_numpy(parts["val"][i:i + 256])])
                                     for i in range(0, len(parts["val"]), 256)]).half()
        val.region_mask = torch.ones(val.regions.shape[:2], dtype=torch.bool)
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val": validate(model, val, CPU),
                 "seconds": round(time.perf_counter() - started, 1)}
        history.append(entry)
        print(json.dumps(entry), flush=True)
        if best is None or entry["val"]["R@10"] > best[0]["val"]["R@10"]:
            best = (entry, copy.deepcopy(model.state_dict()), copy.deepcopy(adapted.stage.state_dict()))
    model.load_state_dict(best[1])
    adapted.stage.load_state_dict(best[2])
    model.eval(), adapted.stage.eval()
    scored = out / "adapted.h5"  # the store with the adapted features: the stock evaluate scores it
    shutil.copy(store_path, scored)
    with FeatureStore.open(scored, writable=True) as store, torch.no_grad():
        for start in range(0, len(acts), 256):
            regions = adapted(acts[start:start + 256]).numpy().astype(np.float16)
            store.write_features(np.arange(start, start + len(regions)),
                                 {"image_global": regions[:, 0], "regions": regions[:, 1:]})
    save_model(model, out / "model", {"backbone": meta["backbone"], "image_dim": meta["image_dim"],
                                      "text_dim": meta["text_dim"], "precision": "fp32", "epoch": best[0]["epoch"],
                                      "split": {"test_fraction": 0.15, "val_fraction": 0.1, "seed": seed}})
    instance = evaluate(scored, out / "model", hierarchy=HIERARCHY)
    graded = evaluate(scored, out / "model", queries_path=str(QUERIES))
    result = {"config": f"finetune-cut{cut}", "seed": seed, "stage_lr": stage_lr, "text_columns": text_columns,
              "best_epoch": best[0]["epoch"],
              "epoch_s": [e["seconds"] for e in history], **instance["metrics"], **graded["metrics"]}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    scored.unlink()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("cache")
    one.add_argument("--store", type=Path, required=True)
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--cut", type=int, default=6)
    two = sub.add_parser("train")
    two.add_argument("--store", type=Path, required=True)
    two.add_argument("--acts", type=Path, required=True)
    two.add_argument("--cut", type=int, default=6)
    two.add_argument("--seed", type=int, default=0)
    two.add_argument("--out", type=Path, required=True)
    two.add_argument("--stage-lr", type=float, default=1e-4)
    two.add_argument("--epochs", type=int, default=10)
    two.add_argument("--text-columns", nargs="*", default=[], help="attribute training texts, as training.text_columns")
    args = parser.parse_args()
    if args.command == "cache":
        cache(args.store, args.out, args.cut)
    else:
        train(args.store, args.acts, args.cut, args.seed, args.out, args.stage_lr, args.epochs, args.text_columns)


if __name__ == "__main__":
    main()
