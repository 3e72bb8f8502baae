"""`hsl train` and `hsl eval`: learn the HSL heads on a store, and score a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hsl.options import DEVICE, EVAL_BACKEND, EVAL_SPLIT, MILVUS_INDEX, PRECISION, TrainOptions

from .app import app
from .options import (
    BackendOption,
    DeviceOption,
    JsonOption,
    MilvusIndexOption,
    MilvusUriOption,
    PrecisionOption,
    QuietOption,
    StoreOption,
    TrainedModelOption,
)
from .render import err, handle_errors, out, print_json, progress_bar


@app.command()
@handle_errors
def train(
    store: StoreOption,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    config: Annotated[str, typer.Option(help="Config name (hsl-default, hsl-paper, dual, ...) or JSON path.")]
    = TrainOptions.config,
    epochs: Annotated[int | None, typer.Option(min=1, help="Default: the config's.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=2, help="Default: the config's.")] = None,
    lr: Annotated[float | None, typer.Option(min=0, help="Learning rate. Default: the config's.")] = None,
    val_fraction: Annotated[float | None, typer.Option(
        min=0.0, max=0.9, help="Share of products that validates each epoch and picks the best (0: none, the last "
        "epoch is kept). Default: the config's (0.1; hsl-members3: 0).")] = TrainOptions.val_fraction,
    test_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Fixed hold-out never trained on.")]
    = TrainOptions.test_fraction,
    seed: Annotated[int, typer.Option(help="Seed of the split, shuffle and initialisation.")] = TrainOptions.seed,
    resume: Annotated[bool, typer.Option(help="Continue from the last finished epoch in --out.")] = False,
    max_products: Annotated[int | None, typer.Option(min=2, help="Train on a seeded sample of this many "
                                                     "products (default: all; a large store streams).")] = None,
    member_processes: Annotated[int, typer.Option(
        "--member-processes", min=0, help="A config of several members: how many train at once, a process each "
        "(0: all of them on the CPU; 1: one after another in this process).")] = TrainOptions.member_processes,
    device: DeviceOption = TrainOptions.device,
    precision: PrecisionOption = TrainOptions.precision,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Train HSL on the (title, photo) pairs of a store; keeps the best epoch by validation R@10 (or the last).

    Under `torchrun --nproc-per-node N` the processes share each batch (DistributedDataParallel);
    rank 0 alone reports and writes."""
    from hsl.devices import resolve_device
    from hsl.distributed import from_env
    from hsl.train import train as run_train

    options = TrainOptions(config=config, epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
                           test_fraction=test_fraction, seed=seed, device=str(resolve_device(device)), resume=resume,
                           precision=precision, max_products=max_products, member_processes=member_processes)

    main_rank = from_env().is_main
    quiet = quiet or not main_rank

    def report_epoch(entry: dict) -> None:
        if not quiet:
            val = "  ".join(f"val {k} {v:.3f}" for k, v in entry["val"].items()
                             if not k.startswith("MRR"))
            member = f"member {entry['member'] + 1}/{entry['members']} " if "member" in entry else ""
            err.print(f"{member}epoch {entry['epoch']}: loss {entry['loss']:.4f}  {val}  ({entry['seconds']:.0f}s, "
                      f"peak memory {entry['peak_rss_mb']:,.0f} MB)", highlight=False)

    with progress_bar("training", quiet, unit="steps") as progress:
        record = run_train(store, out_dir, options, on_step=lambda step, total, loss: progress(step, total),
                           on_epoch=report_epoch)
    if not main_rank:
        return
    best = record["best"]
    if json_output:
        print_json({"out": str(out_dir), "best_epoch": best["epoch"], "val": best["val"], "split": record["split"],
                    "streamed": record["streamed"], "peak_rss_mb": record["history"][-1]["peak_rss_mb"]})
    else:
        for k, member in enumerate(record.get("members", [record])):  # one line per member
            best = member["best"]
            name = f"member {k + 1}: " if "members" in record else ""
            score = f"val R@10 {best['val']['R@10']:.3f}" if best["val"] else "no validation split: last epoch"
            out.print(f"{name}best epoch {best['epoch']}: {score} -> {out_dir}", highlight=False)


@app.command("eval")
@handle_errors
def evaluate(
    store: StoreOption,
    model: TrainedModelOption,
    queries: Annotated[Path | None, typer.Option(help="JSONL: {query, relevant: [ids]} or {query, attributes}.")]
    = None,
    answers: Annotated[Path | None, typer.Option(help="KDD Cup 2020 answer JSON (query id -> product ids): each "
                                                 "query ranks only its own pool; official NDCG@5.")] = None,
    split: Annotated[str, typer.Option(help="auto (the model's test split), all, train, val or test.")] = EVAL_SPLIT,
    hierarchy: Annotated[str | None, typer.Option(help="Category columns, root first, for HP@K.")] = None,
    backend: BackendOption = EVAL_BACKEND,
    milvus_uri: MilvusUriOption = None,
    milvus_index: MilvusIndexOption = MILVUS_INDEX,
    device: DeviceOption = DEVICE,
    precision: PrecisionOption = PRECISION,
    json_output: JsonOption = False,
) -> None:
    """Score a trained model: Recall@K, MRR@10, mAP@10, P@K, NDCG@5 (KDD Cup 2020), graded NDCG@10, HP@K."""
    from hsl.devices import resolve_device
    from hsl.evaluate import evaluate as run_eval

    from .search_commands import milvus_options

    columns = [c.strip() for c in hierarchy.split(",")] if hierarchy else None
    result = run_eval(store, model, str(queries) if queries else None, split=split, hierarchy=columns,
                      device=str(resolve_device(device)), answers_path=str(answers) if answers else None,
                      precision=precision, backend=backend, milvus=milvus_options(milvus_uri, milvus_index))
    if json_output:
        print_json(result)
        return
    table = Table(title=f"{result['queries']} queries, gallery of {result['gallery']} ({result['split']} split, "
                        f"{result['precision']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.4f}")
    out.print(table)
