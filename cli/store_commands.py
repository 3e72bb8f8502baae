"""`hsl extract`, `hsl merge` and `hsl info`: build a feature store, join shards, look inside."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hsl.options import ExtractOptions
from hsl_data.sources import Columns

from .app import app
from .options import BatchOption, DeviceOption, JsonOption, PrecisionOption, QuietOption, StoreOption
from .render import display_path, err, handle_errors, out, print_json, progress_bar


@app.command()
@handle_errors
def extract(
    source: Annotated[Path, typer.Argument(help="A folder of photos, a .csv / .jsonl manifest, or a KDD Cup 2020 "
                                                "TSV (.tsv: detector boxes, no image backbone).")],
    store: StoreOption = Path("catalog.h5"),
    backbone: Annotated[str | None, typer.Option(help="minilm-effnet (default), tiny, openclip:ARCH/TAG|PATH;"
                                                 " for a KDD Cup TSV the text side only: minilm (default), tiny."
                                                 " Default: the store's own, for an existing store.")] = None,
    grid: Annotated[int | None, typer.Option(min=1, help="Pool the region grid to N x N cells.")] = None,
    max_text_tokens: Annotated[int | None, typer.Option(min=1, help="Title tokens kept per product.")] = None,
    id_column: Annotated[str, typer.Option(help="Manifest column with the product id.")] = Columns.id,
    image_column: Annotated[str, typer.Option(help="Manifest column with the image path.")] = Columns.image,
    text_column: Annotated[str, typer.Option(help="Manifest column with the title.")] = Columns.text,
    image_template: Annotated[str | None, typer.Option(help="Build the image path, e.g. 'images/{id}.jpg'.")] = None,
    batch_size: BatchOption = ExtractOptions.batch_size,
    workers: Annotated[int | None, typer.Option(min=0, help="Photo-decoding processes (default: cores-1).")] = None,
    device: DeviceOption = ExtractOptions.device,
    precision: PrecisionOption = ExtractOptions.precision,
    max_pixels: Annotated[int | None, typer.Option(min=1, help="Refuse photos with more pixels.")] = None,
    max_boxes: Annotated[int | None, typer.Option(min=1, help="KDD Cup TSV: keep the N largest boxes per image "
                                                  "(default 20, as in the paper).")] = None,
    limit: Annotated[int | None, typer.Option(min=0, help="Only the first N products of the source.")] = None,
    allow_outside: Annotated[bool, typer.Option(help="Let manifest image paths leave the manifest's folder.")]
    = False,
    errors: Annotated[Path | None, typer.Option(help="Write one JSON line per skipped item here.")] = None,
    strict: Annotated[bool, typer.Option(help="Exit 1 when any item was skipped.")] = False,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Extract photo and title features into an HDF5 store (resumable; re-runs add only what is new).

    Under `torchrun --nproc-per-node N` each process extracts a share into STORE.shards/ and rank 0
    merges them into STORE; only rank 0 prints.
    """
    from hsl.distributed import from_env
    from hsl.extract import extract as run_extract
    from hsl.options import DEFAULT_MAX_PIXELS, default_workers

    options = ExtractOptions(
        backbone=backbone, grid=grid, max_text_tokens=max_text_tokens, batch_size=batch_size,
        workers=default_workers() if workers is None else workers, device=device, precision=precision,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS, limit=limit, allow_outside=allow_outside, max_boxes=max_boxes,
        columns=Columns(id=id_column, image=image_column, text=text_column, image_template=image_template))
    me = from_env()
    label = f"extracting (rank 0's share of {me.world})" if me.distributed else "extracting"
    with progress_bar(label, quiet or not me.is_main, unit="img") as progress:
        report = run_extract(source, store, options, progress=progress, me=me)
    if not me.is_main:  # rank 0 reports the whole job; the other ranks only agree on the exit code
        if strict and report.skipped:
            raise typer.Exit(1)
        return
    if errors is not None:
        report.write_errors(errors)
    summary = {"store": report.store, "source_items": report.source_items, "extracted": report.extracted,
               "already_done": report.already_done, "skipped": len(report.skipped),
               "skipped_by_reason": report.skipped_by_reason(), "seconds": round(report.seconds, 2),
               "processes": report.processes}
    if json_output:
        print_json(summary)
    else:
        out.print(f"{report.extracted} extracted, {report.already_done} already in the store, "
                  f"{len(report.skipped)} skipped in {report.seconds:.1f}s -> {display_path(report.store)}"
                  + (f" ({report.processes} processes)" if report.processes > 1 else ""), highlight=False)
        for reason, count in report.skipped_by_reason().items():
            out.print(f"  skipped {count:>6} {reason}", highlight=False)
        for item in report.skipped[:5]:
            err.print(f"  skipped {item.where}: {item.reason} ({item.detail})", highlight=False, soft_wrap=True)
        if len(report.skipped) > 5:
            err.print(f"  ... {len(report.skipped) - 5} more" + ("" if errors else "; list them with --errors FILE"))
    if strict and report.skipped:
        raise typer.Exit(1)


@app.command()
@handle_errors
def merge(
    shards: Annotated[list[Path], typer.Argument(help="Shard stores to join, in order (e.g. OUT.h5.shards/*.h5).")],
    store: Annotated[Path, typer.Option("--store", "-s", help="The merged store. An existing one is merged into: "
                                        "a shard row replaces the row with its id, new ids follow.")],
    json_output: JsonOption = False,
) -> None:
    """Join shard stores of one extraction into one store (atomic; re-running gives the same store)."""
    from hsl.merge import merge as run_merge

    report = run_merge(shards, store)
    if json_output:
        print_json({**asdict(report), "seconds": round(report.seconds, 2)})
        return
    out.print(f"{report.rows} rows from {len(report.shards)} shard(s) ({report.done} done, {report.not_done} still "
              f"to extract, {report.replaced} replaced) in {report.seconds:.1f}s -> {display_path(report.store)}",
              highlight=False)


@app.command()
@handle_errors
def info(store: Annotated[Path, typer.Argument(help="HDF5 feature store.")], json_output: JsonOption = False) -> None:
    """Show what a store holds: count, backbone, feature sizes, attribute columns, size on disk."""
    from hsl.store import FeatureStore

    with FeatureStore.open(store) as opened:
        facts = opened.info()
    if json_output:
        print_json(facts)
        return
    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        if key == "file_bytes":
            value = f"{value / 1e6:,.1f} MB"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        table.add_row(key, str(value))
    out.print(table)
