"""`hsl train`: learn the HSL heads on the (title, photo) pairs of a store.

Deterministic for a fixed seed on CPU, for one precision (hsl/precision.py; `auto` resolves the same
way on the same machine): the split comes from hashed ids, each epoch's shuffle and
dropout from (seed, epoch). After every epoch the full training state goes to `DIR/checkpoint/`
atomically, so `--resume` after a kill continues from the last finished epoch and ends with the
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import __version__, distributed
from .atomic import write_text_atomic
from .checkpoint import Checkpoint
from .config import load_config
from .dataset import Products, Split, feature_bytes, load_products
from .errors import HSLError, HSLUsageError
from .evaluate import rank_products
from .factory import create_model, save_model
from .losses import LossBatch, build_losses
from .metrics import mrr, recall_at_k
from .model import ImageEncoding, TextEncoding
from .objectives import build_context, encode_labels, head_parameters, heads_state, load_heads_state, save_heads
from .precision import resolve_precision
from .store import FeatureStore

EpochFn = Callable[[dict], None]  # called after each epoch with its record
StepFn = Callable[[int, int, float], None]  # (step, steps per epoch, loss)


@dataclass
class TrainOptions:
    config: str = "hsl-default"
    epochs: int | None = None  # None: the config's
    batch_size: int | None = None
    lr: float | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.15  # a fixed, seed-independent hold-out that training never sees
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    precision: str = "auto"  # of the towers' forward passes; auto: the fastest on the device (hsl/precision.py)
    max_products: int | None = None  # train on a seeded sample of this many training products (None: all)
    memory_budget: int = 2 << 30  # bytes of features held in memory; a larger training set streams from the store


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
    ranked = rank_products(model, products, products.tokens, products.token_mask, device, top_k=10)
    relevant = [{i} for i in products.ids]
    return {"R@1": recall_at_k(ranked, relevant, 1), "R@5": recall_at_k(ranked, relevant, 5),
            "R@10": recall_at_k(ranked, relevant, 10), "MRR": mrr(ranked, relevant)}


def train(store_path: str | os.PathLike, out_dir: str | os.PathLike, options: TrainOptions | None = None,
          on_step: StepFn | None = None, on_epoch: EpochFn | None = None) -> dict:
    """Train, keep the best epoch by validation R@10 in `out_dir`, return the metrics record."""
    options = options or TrainOptions()
    out = Path(out_dir)
    ckpt = Checkpoint(out / "checkpoint")
    if out.exists() and any(out.iterdir()) and not options.resume:
        raise HSLUsageError(f"{out} is not empty; give another --out, or --resume to continue its training")
    # --resume before any epoch finished (a kill during the first one) simply starts from scratch.
    resuming = options.resume and ckpt.exists()
    device = torch.device(options.device)
    me = distributed.init(device)
    if me.distributed and device.type == "cuda":
        device = torch.device("cuda", me.local_rank)  # one GPU per process, as torchrun's local rank says
    distributed.barrier()  # every rank has looked at --out before rank 0 writes into it
    config = load_config(options.config)
    with FeatureStore.open(store_path) as store:
        products = load_products(store, require_text=True, region_grid=config.region_grid, in_memory=False)
        store_meta = dict(store.meta)
    split = Split(options.test_fraction, options.val_fraction, options.seed)
    parts = _capped(split.indices(products.ids), options.max_products, options.seed)
    train_set, val_set = products.subset(parts["train"]), products.subset(parts["val"]).loaded()
    if len(train_set) * feature_bytes(store_meta, config.region_grid) <= options.memory_budget:
        train_set = train_set.loaded()  # fits: batches come from memory; else each one from the store
    if len(train_set) < 2 or (len(val_set) < 1 and options.val_fraction > 0):
        raise HSLUsageError(f"split gives {len(train_set)} training and {len(val_set)} validation products; "
                            "extract more products or change --val-fraction")
    context = build_context(config, train_set, store_meta["backbone"])
    torch.manual_seed(options.seed)
    precision = resolve_precision(options.precision, device)
    model = create_model(config, store_meta["image_dim"], store_meta["text_dim"]).to(device).use_precision(precision)
    # Heads of SGML/HUSE initialise after the model, so configs without them draw exactly as before.
    losses = {name: loss.to(device) for name, loss in build_losses(model.config, context).items()}
    # Model parameters first: the optimizer's state indices of the model stay those of an HSL-only run.
    params = [*model.parameters(), *head_parameters(losses)]
    labels = encode_labels(train_set.attributes, context.vocab)  # column -> [N] label index
    settings = dict(model.config.training)
    epochs = options.epochs or settings["epochs"]
    batch_size = options.batch_size or settings["batch_size"]
    lr = options.lr or settings["lr"]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=settings.get("weight_decay", 0.0))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=settings["lr_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_grad_scaling)
    meta = {"backbone": store_meta["backbone"], "image_dim": store_meta["image_dim"],
            "text_dim": store_meta["text_dim"], "precision": precision.name, "hsl_version": __version__}
    args = {**asdict(options), "epochs": epochs, "batch_size": batch_size, "lr": lr, "store": str(store_path),
            "precision": precision.name}
    record = {"history": [], "best": None, "split": {k: int(len(v)) for k, v in parts.items()},
              "streamed": train_set.source is not None}
    start_epoch = 0
    if resuming:
        tensors, state = ckpt.load()
        if state["args"]["config"] != options.config or state["args"]["seed"] != options.seed:
            raise HSLUsageError(f"{out} was trained with config {state['args']['config']} and seed "
                                f"{state['args']['seed']}; resume with the same --config and --seed")
        trained_in = state["args"].get("precision", "fp32")  # checkpoints from before precision was recorded
        if trained_in != precision.name:  # another precision would not end with the same weights
            raise HSLUsageError(f"{out} was trained in {trained_in}, this run would train in {precision.name}; "
                                f"resume with --precision {trained_in}")
        model.load_state_dict(tensors["model"])
        load_heads_state(losses, tensors.get("objectives", {}), str(ckpt.folder))
        _load_optimizer(optimizer, tensors["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # the optimizer's state above came with the initial learning rate
        record, start_epoch = state["record"], state["epoch"]
    if me.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "train_args.json", json.dumps({**args, "processes": me.world}, indent=2))
    towers = _Towers(model)
    if me.distributed:
        towers = DistributedDataParallel(towers, device_ids=[device.index] if device.type == "cuda" else None)
    keys = train_set.title_keys()
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        loss = _train_epoch(towers, model, losses, params, (optimizer, scaler), train_set, keys, labels, batch_size,
                            settings, options.seed, epoch, device, me, on_step)
        scheduler.step()
        if not me.is_main:  # the other ranks only help with the gradients
            continue
        # --val-fraction 0 (train on everything, e.g. the shipped model): the last epoch is kept.
        metrics = validate(model, val_set, device) if len(val_set) else {}
        entry = {"epoch": epoch + 1, "loss": loss, "val": metrics, "seconds": round(time.perf_counter() - started, 2),
                 "peak_rss_mb": _peak_rss_mb()}
        record["history"].append(entry)
        if not metrics or record["best"] is None or metrics["R@10"] > record["best"]["val"]["R@10"]:
            record["best"] = entry
            save_model(model, out, {**meta, "epoch": epoch + 1, "split": asdict(split)})
            save_heads(out, losses, context)
        write_text_atomic(out / "metrics.json", json.dumps(record, indent=2))
        # The checkpoint goes last: a kill before this line redoes the epoch, with the same result.
        tensors = {"model": model.state_dict(), "optimizer": _optimizer_tensors(optimizer)}
        heads = heads_state(losses)
        if heads:
            tensors["objectives"] = heads
        ckpt.save(epoch + 1, tensors,
                  {"epoch": epoch + 1, "scheduler": scheduler.state_dict(), "record": record, "args": args,
                   "grad_scaler": scaler.state_dict()})  # {} unless fp16
        if on_epoch:
            on_epoch(entry)
    distributed.barrier()  # no rank leaves (and tears the group down) while rank 0 still writes
    distributed.finish()
    if record["best"] is None and me.is_main:
        raise HSLError(f"{out}: no epoch was trained (epochs={epochs})")
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
        raise HSLUsageError(f"--max-products must be at least 2, not {max_products}")
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
                token_mask: torch.Tensor) -> tuple[TextEncoding, ImageEncoding]:
        image = self.model.encode_image(regions, region_mask)  # image first: the dropout draws of one process
        return self.model.encode_text(tokens, token_mask), image


def _gather(text: TextEncoding, image: ImageEncoding, me: distributed.Rank) -> tuple[TextEncoding, ImageEncoding]:
    """Every rank's encodings of its share, in rank order: the whole global batch, differentiably."""
    if not me.distributed:
        return text, image

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_gather_rows(tensor, me)

    mask = rows(image.mask.to(torch.uint8)).bool()  # gloo gathers no bool tensors
    return (TextEncoding([rows(q) for q in text.object_queries], [rows(q) for q in text.image_queries]),
            ImageEncoding([rows(o) for o in image.objects], [rows(v) for v in image.images], mask))


def _train_epoch(towers: nn.Module, model: nn.Module, losses: dict, params: list,
                 steppers: tuple[torch.optim.Optimizer, torch.amp.GradScaler], products: Products,
                 keys: torch.Tensor, labels: dict[str, torch.Tensor], batch_size: int,
                 settings: dict, seed: int, epoch: int, device: torch.device, me: distributed.Rank,
                 on_step: StepFn | None) -> float:
    optimizer, scaler = steppers
    model.train()
    # Every rank draws the same global order; dropout differs per rank (rank 0 draws as one process does).
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    torch.manual_seed(seed * 100_003 + epoch + 1_000_003 * me.rank)  # dropout: the same masks after a resume
    order = torch.randperm(len(products), generator=generator)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    # A batch of one has no negatives; one smaller than the number of ranks would leave a rank idle.
    batches = [b for b in batches if len(b) > 1 and len(b) >= me.world]
    total = 0.0
    for step, index in enumerate(batches):
        part = distributed.share(len(index), me)  # this rank's share of the global batch
        mine = index[part.start:part.stop]
        text, image = towers(*products.image_batch(mine, device), *products.text_batch(mine, device))
        text, image = _gather(text, image, me)
        batch = LossBatch(model.similarities(text, image), keys[index].to(device), text, image,
                          {column: values[index].to(device) for column, values in labels.items()},
                          model.index_vectors(image), model.query_vectors(text))
        loss = sum(weight * losses[name](batch) for name, weight in model.config.losses.items())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the scaler is a pass-through unless fp16 (Precision.needs_grad_scaling)
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(params, settings["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        total += loss.item()
        if on_step:
            on_step(step + 1, len(batches), loss.item())
    model.eval()
    return total / max(1, len(batches))
