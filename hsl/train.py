"""`hsl train`: learn the HSL heads on the (title, photo) pairs of a store.

Deterministic for a fixed seed on CPU, for one precision (hsl/precision.py; `auto` resolves the same
way on the same machine): the split comes from hashed ids, each epoch's shuffle and
dropout from (seed, epoch). After every epoch the full training state goes to `DIR/checkpoint/`
atomically, so resuming after a kill continues from the last finished epoch and ends with the
same weights as an uninterrupted run.

Under `torchrun` (hsl/distributed.py) the towers run in DistributedDataParallel: every rank draws
the same global batches, encodes its own share of each, and gathers the encodings of all shares, so
the in-batch loss sees exactly the negatives of a one-process run with the same global batch. Only
rank 0 validates and writes the model folder and checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import __version__, distributed
from .atomic import write_text_atomic
from .attribute_texts import AttributeTexts
from .averaging import WeightAverage
from .batches import epoch_batches
from .checkpoint import Checkpoint
from .dataset import Products, Split, feature_bytes, load_products
from .errors import HSLError, HSLUsageError
from .evaluate import rank_products, title_queries
from .factory import create_model, model_config, save_model
from .loss_batch import LossBatch
from .losses import build_losses, hsl_loss, losses_need
from .members import train_members
from .metrics import current_names, mrr, recall_at_k
from .model import ImageEncoding, TextEncoding
from .objectives import build_context, encode_labels, head_parameters, heads_state, load_heads_state, save_heads
from .options import TrainOptions
from .precision import resolve_precision
from .store import FeatureStore

EpochFn = Callable[[dict], None]  # called after each epoch with its record
StepFn = Callable[[int, int, float], None]  # (step, steps per epoch, loss)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's state as flat tensors: safetensors holds tensors only, never pickles."""
    out = {}
    for i, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


def validate(model: torch.nn.Module, products: Products, device: torch.device) -> dict[str, float]:
    """Instance retrieval within the split: each title must find its own photo."""
    ranked = rank_products(model, products, title_queries(products), len(products), device, top_k=10)
    relevant = [{i} for i in products.ids]
    return {"R@1": recall_at_k(ranked, relevant, 1), "R@5": recall_at_k(ranked, relevant, 5),
            "R@10": recall_at_k(ranked, relevant, 10), "MRR@10": mrr(ranked, relevant)}


def train(store_path: str | os.PathLike, out_dir: str | os.PathLike, options: TrainOptions | None = None,
          on_step: StepFn | None = None, on_epoch: EpochFn | None = None) -> dict:
    """Train, keep the best epoch by validation R@10 in `out_dir`, return the metrics record (a config
    of several members trains each on its own, then joins them: hsl/members.py)."""
    options = options or TrainOptions()
    config = model_config(options.config)
    if config.members > 1:
        return train_members(store_path, out_dir, options, config, Trainer, on_epoch, on_step)
    return Trainer(store_path, out_dir, options).run(on_step, on_epoch)


class Trainer:
    """One training run, read top to bottom: __init__ sets up (data, model, losses, optimizer, resume),
    run() loops run_epoch (every rank) and end_epoch (rank 0: validate, keep the best, checkpoint)."""

    def __init__(self, store_path: str | os.PathLike, out_dir: str | os.PathLike, options: TrainOptions) -> None:
        self.options, self.out = options, Path(out_dir)
        self.ckpt = Checkpoint(self.out / "checkpoint")
        if self.out.exists() and any(self.out.iterdir()) and not options.resume:
            raise HSLUsageError(f"{self.out} is not empty; give another `out`, or `resume` to continue its training",
                                "out", str(self.out))
        # Resuming before any epoch finished (a kill during the first one) simply starts from scratch.
        resuming = options.resume and self.ckpt.exists()
        self.device = torch.device(options.device)
        self.me = distributed.init(self.device)
        if self.me.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.me.local_rank)  # one GPU per process, as torchrun's local rank says
        distributed.barrier()  # every rank has looked at the out folder before rank 0 writes into it
        self.config = model_config(options.config)  # a config whose losses the model cannot serve fails here
        self._load_data(store_path)
        self._build_model()
        self._build_optimizer()
        self.meta = {"backbone": self.store_meta["backbone"], "image_dim": self.store_meta["image_dim"],
                     "text_dim": self.store_meta["text_dim"], "precision": self.precision.name,
                     "hsl_version": __version__}
        self.args = {**asdict(options), "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                     "val_fraction": self.split.val_fraction,
                     "store": str(store_path), "precision": self.precision.name}
        self.record = {"history": [], "best": None, "split": {k: int(len(v)) for k, v in self.parts.items()},
                       "streamed": self.train_set.source is not None}
        decay = float(self.settings.get("average_decay") or 0.0)
        self.average = WeightAverage(self.model, decay) if decay else None  # what validation scores and saves
        self.start_epoch = self._resume() if resuming else 0
        if self.me.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "train_args.json",
                              json.dumps({**self.args, "processes": self.me.world}, indent=2))
        self.towers: nn.Module = _Towers(self.model)
        if self.me.distributed:
            self.towers = DistributedDataParallel(self.towers, device_ids=[self.device.index]
                                                  if self.device.type == "cuda" else None)
        self.keys = self.train_set.title_keys()
        self.groups = _group_values(self.train_set, str(self.settings.get("group_column", "")))
        self.record["batches"] = f"runs of {self.settings['group_column']}" if self.groups else "random"
        self.texts = self._attribute_texts()

    def _load_data(self, store_path: str | os.PathLike) -> None:
        """The split's training set (in memory when it fits, else streamed) and validation set."""
        options = self.options
        with FeatureStore.open(store_path) as store:
            products = load_products(store, require_text=True, region_grid=self.config.region_grid, in_memory=False)
            self.store_meta = dict(store.meta)
        val_fraction = options.val_fraction
        if val_fraction is None:
            val_fraction = float(self.config.training["val_fraction"])  # merged with the defaults (hsl/config.py)
        self.split = Split(options.test_fraction, val_fraction, options.seed)
        self.parts = _capped(self.split.indices(products.ids), options.max_products, options.seed)
        self.train_set = products.subset(self.parts["train"])
        self.val_set = products.subset(self.parts["val"]).loaded()
        if len(self.train_set) * feature_bytes(self.store_meta, self.config.region_grid) <= options.memory_budget:
            self.train_set = self.train_set.loaded()  # fits: batches come from memory; else each one from the store
        if len(self.train_set) < 2 or (len(self.val_set) < 1 and val_fraction > 0):
            raise HSLUsageError(f"split gives {len(self.train_set)} training and {len(self.val_set)} validation "
                                "products; extract more products or change `val_fraction`", "val_fraction",
                                val_fraction)

    def _build_model(self) -> None:
        """Model, losses (with their heads) and label indices; the order of the random draws is fixed."""
        self.context = build_context(self.config, self.train_set, self.store_meta["backbone"])
        torch.manual_seed(self.options.seed)
        self.precision = resolve_precision(self.options.precision, self.device)
        self.model = create_model(self.config, self.store_meta["image_dim"], self.store_meta["text_dim"])
        self.model = self.model.to(self.device).use_precision(self.precision)
        # Heads of SGML/HUSE initialise after the model, so configs without them draw exactly as before.
        self.losses = {name: loss.to(self.device)
                       for name, loss in build_losses(self.model.config, self.context).items()}
        # What the losses read of a batch: a batch computes only that (e.g. no index vectors for HSL alone).
        self.needs = losses_need(self.model.config)
        # Model parameters first: the optimizer's state indices of the model stay those of an HSL-only run.
        self.params = [*self.model.parameters(), *head_parameters(self.losses)]
        self.labels = encode_labels(self.train_set.attributes, self.context.vocab)  # column -> [N] label index

    def _build_optimizer(self) -> None:
        self.settings = dict(self.model.config.training)
        self.epochs = self.options.epochs or self.settings["epochs"]
        self.batch_size = self.options.batch_size or self.settings["batch_size"]
        self.lr = self.options.lr or self.settings["lr"]
        self.optimizer = torch.optim.Adam(self.params, lr=self.lr, weight_decay=self.settings.get("weight_decay", 0.0))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=self.settings["lr_decay"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_grad_scaling)

    def _attribute_texts(self) -> AttributeTexts | None:
        """The training queries written from attribute columns, encoded once; None for titles alone."""
        columns = list(self.settings.get("text_columns") or [])
        if not columns or not self.settings.get("text_weight"):
            return None
        # Encoded on the CPU as the store's titles were (fp16, a GPU precision, is not one for the CPU).
        stored = self.store_meta.get("precision", "auto")
        texts = AttributeTexts(self.train_set.attributes, columns, self.store_meta["backbone"],
                               self.store_meta["max_text_tokens"], stored if stored in ("fp32", "bf16") else "auto")
        self.record["attribute_texts"] = {"columns": texts.columns, "texts": len(texts.tokens)}
        if not texts:
            return None
        self.text_loss = hsl_loss(self.model.config)
        return texts

    def _resume(self) -> int:
        """Load the last checkpoint and the record up to its epoch; the epoch to start from."""
        tensors, state = self.ckpt.load()
        trained = state["args"]
        if trained["config"] != self.options.config or trained["seed"] != self.options.seed:
            raise HSLUsageError(f"{self.out} was trained with config {trained['config']} and seed "
                                f"{trained['seed']}; resume with the same `config` and `seed`", "config",
                                self.options.config)
        split = (self.split.test_fraction, self.split.val_fraction)
        was = (trained.get("test_fraction", split[0]), trained.get("val_fraction", split[1]))
        if was != split:  # other products would train from here on
            raise HSLUsageError(f"{self.out} was trained with test_fraction {was[0]} and val_fraction {was[1]}, "
                                f"this run has {split[0]} and {split[1]}; resume with the same fractions",
                                "val_fraction", split[1], [was[1]])
        trained_in = trained.get("precision", "fp32")  # checkpoints from before precision was recorded
        if trained_in != self.precision.name:  # another precision would not end with the same weights
            raise HSLUsageError(f"{self.out} was trained in {trained_in}, this run would train in "
                                f"{self.precision.name}; resume with `precision` {trained_in}", "precision",
                                self.options.precision, [trained_in])
        self.model.load_state_dict(tensors["model"])
        if self.average is not None:
            self.average.model.load_state_dict(tensors["average"])
        load_heads_state(self.losses, tensors.get("objectives", {}), str(self.ckpt.folder))
        _load_optimizer(self.optimizer, tensors["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # the optimizer's state above came with the initial learning rate
        # Checkpoints from before the record lived in metrics.json alone carry it in their state.
        self.record = state.get("record") or _record_until(self.out / "metrics.json", state["epoch"])
        for entry in [*self.record["history"], self.record["best"] or {}]:  # from before MRR was named MRR@10
            entry["val"] = current_names(entry.get("val", {}))
        return state["epoch"]

    def run(self, on_step: StepFn | None = None, on_epoch: EpochFn | None = None) -> dict:
        """Every epoch from the start (or the checkpoint) to the last; the metrics record."""
        for epoch in range(self.start_epoch, self.epochs):
            started = time.perf_counter()
            loss = self.run_epoch(epoch, on_step)
            self.scheduler.step()
            if not self.me.is_main:  # the other ranks only help with the gradients
                continue
            entry = self.end_epoch(epoch, loss, time.perf_counter() - started)
            if on_epoch:
                on_epoch(entry)
        distributed.barrier()  # no rank leaves (and tears the group down) while rank 0 still writes
        distributed.finish()
        if self.record["best"] is None and self.me.is_main:
            raise HSLError(f"{self.out}: no epoch was trained (epochs={self.epochs})")
        return self.record

    def run_epoch(self, epoch: int, on_step: StepFn | None) -> float:
        """One pass over the training set, in (seed, epoch) order; the mean loss of its batches."""
        seed, me = self.options.seed, self.me
        self.model.train()
        # Every rank draws the same global order; dropout differs per rank (rank 0 draws as one process does).
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        torch.manual_seed(seed * 100_003 + epoch + 1_000_003 * me.rank)  # dropout: the same masks after a resume
        batches = epoch_batches(len(self.train_set), self.batch_size, generator, self.groups,
                                int(self.settings.get("group_size", 0)))
        # A batch of one has no negatives; one smaller than the number of ranks would leave a rank idle.
        batches = [b for b in batches if len(b) > 1 and len(b) >= me.world]
        self.text_draws = torch.Generator().manual_seed(seed * 100_003 + epoch + 7)  # every rank the same
        total = 0.0
        for step, index in enumerate(batches):
            loss = self._step(index)
            total += loss
            if on_step:
                on_step(step + 1, len(batches), loss)
        self.model.eval()
        return total / max(1, len(batches))

    def _step(self, index: torch.Tensor) -> float:
        """One optimizer step on the global batch `index` (this rank encodes its share); its loss."""
        part = distributed.share(len(index), self.me)  # this rank's share of the global batch
        mine = index[part.start:part.stop]
        model, device = self.model, self.device
        extra, extra_negatives = (), None
        if self.texts is not None:
            tokens, mask, extra_negatives = self.texts.draw(index, self.text_draws)
            extra = (tokens[part.start:part.stop].to(device), mask[part.start:part.stop].to(device))
        text, image, *shopper = self.towers(*self.train_set.image_batch(mine, device),
                                            *self.train_set.text_batch(mine, device), *extra)
        text, image = _gather(text, image, self.me)
        needs = self.needs
        batch = LossBatch(self.keys[index].to(device), model.similarities(text, image) if needs.granularities else None,
                          text, image, {column: values[index].to(device) for column, values in self.labels.items()},
                          model.index_vectors(image) if needs.vectors else None,
                          model.query_vectors(text) if needs.vectors else None)
        loss = sum(weight * self.losses[name](batch) for name, weight in model.config.losses.items())
        if shopper:
            loss = loss + self.settings["text_weight"] * self.text_loss(
                LossBatch(batch.keys, model.similarities(_gather_text(shopper[0], self.me), image),
                          false_negatives=extra_negatives.to(device)))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # a pass-through unless fp16 (Precision.needs_grad_scaling)
        self.scaler.unscale_(self.optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(self.params, self.settings["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update()
        return loss.item()

    def end_epoch(self, epoch: int, loss: float, seconds: float) -> dict:
        """Rank 0: validate, keep the model if best, write the record once, then the checkpoint; the entry."""
        # A val_fraction of 0 (train on everything, e.g. the shipped model): the last epoch is kept.
        kept = self.average.model if self.average is not None else self.model
        metrics = validate(kept, self.val_set, self.device) if len(self.val_set) else {}
        entry = {"epoch": epoch + 1, "loss": loss, "val": metrics, "seconds": round(seconds, 2),
                 "peak_rss_mb": _peak_rss_mb()}
        self.record["history"].append(entry)
        if _better(entry, self.record["best"]):
            self.record["best"] = entry
            save_model(kept, self.out, {**self.meta, "epoch": epoch + 1, "split": asdict(self.split)})
            save_heads(self.out, self.losses, self.context)
        write_text_atomic(self.out / "metrics.json", json.dumps(self.record, indent=2))
        # The checkpoint goes last: a kill before this line redoes the epoch, with the same result.
        tensors = {"model": self.model.state_dict(), "optimizer": _optimizer_tensors(self.optimizer)}
        if self.average is not None:
            tensors["average"] = self.average.model.state_dict()
        heads = heads_state(self.losses)
        if heads:
            tensors["objectives"] = heads
        self.ckpt.save(epoch + 1, tensors,
                       {"epoch": epoch + 1, "scheduler": self.scheduler.state_dict(), "args": self.args,
                        "grad_scaler": self.scaler.state_dict()})  # {} unless fp16
        return entry


def _group_values(products: Products, column: str) -> list[str] | None:
    """Each training product's value of the hard-negative column (hsl/batches.py); None: random batches
    (no column set, or a store without it: the shipped config names articleType, which a shop's own
    store may not have; the training record says which batches were used)."""
    if not column or column not in products.attributes:
        return None
    return products.attributes[column]


def _better(entry: dict, best: dict | None) -> bool:
    """Whether an epoch's entry replaces the best so far: higher validation R@10 (no validation: the last)."""
    return not entry["val"] or best is None or entry["val"]["R@10"] > best["val"]["R@10"]


def _record_until(path: Path, epoch: int) -> dict:
    """metrics.json as it was after `epoch`: a kill after it was written, before the checkpoint, left one
    entry more, which the resumed run redoes."""
    record = json.loads(path.read_text(encoding="utf-8"))
    record["history"] = [entry for entry in record["history"] if entry["epoch"] <= epoch]
    record["best"] = None
    for entry in record["history"]:
        if _better(entry, record["best"]):
            record["best"] = entry
    return record


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB): what a training of this size needs."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS, KB elsewhere


def _capped(parts: dict[str, np.ndarray], max_products: int | None, seed: int) -> dict[str, np.ndarray]:
    """At most `max_products` training products (a seeded sample, kept in store order) and a validation
    set in proportion (a tenth of that, at least 100 and at most 2,000: validation ranks every title
    against every photo, so its cost grows with the square): the split itself does not move."""
    if max_products is None:
        return parts
    if max_products < 2:
        raise HSLUsageError(f"`max_products` must be at least 2, not {max_products}", "max_products", max_products)
    rng = np.random.default_rng(seed)
    capped = dict(parts)
    for side, cap in (("train", max_products), ("val", max(100, min(2000, max_products // 10)))):
        if len(parts[side]) > cap:
            capped[side] = np.sort(rng.choice(parts[side], size=cap, replace=False))
    return capped


class _Towers(nn.Module):
    """The model's image and text towers as one forward(): the call that DistributedDataParallel hooks
    into to all-reduce the gradients. (The similarities that follow hold no parameters.)"""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, regions: torch.Tensor, region_mask: torch.Tensor, tokens: torch.Tensor,
                token_mask: torch.Tensor, extra_tokens: torch.Tensor | None = None,
                extra_mask: torch.Tensor | None = None) -> tuple:
        """(text, image) encodings, and the attribute texts' encoding after them when given."""
        image = self.model.encode_image(regions, region_mask)  # image first: the dropout draws of one process
        text = self.model.encode_text(tokens, token_mask)
        if extra_tokens is None:
            return text, image
        return text, image, self.model.encode_text(extra_tokens, extra_mask)


def _gather(text: TextEncoding, image: ImageEncoding, me: distributed.Rank) -> tuple[TextEncoding, ImageEncoding]:
    """Every rank's encodings of its share, in rank order: the whole global batch, differentiably."""
    if not me.distributed:
        return text, image

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_gather_rows(tensor, me)

    mask = rows(image.mask.to(torch.uint8)).bool()  # gloo gathers no bool tensors
    return (_gather_text(text, me),
            ImageEncoding([rows(o) for o in image.objects], [rows(v) for v in image.images], mask))


def _gather_text(text: TextEncoding, me: distributed.Rank) -> TextEncoding:
    if not me.distributed:
        return text
    return TextEncoding([distributed.all_gather_rows(q, me) for q in text.object_queries],
                        [distributed.all_gather_rows(q, me) for q in text.image_queries])
