"""`hsl query` and `hsl index`: search a store with words, and build its search index."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hsl.options import DEVICE, EF_SEARCH, MILVUS_INDEX, NPROBE, PRECISION, SEARCH_BACKEND, TOP_K, IVFPQOptions

from .app import app
from .options import (
    BackendOption,
    DeviceOption,
    EfSearchOption,
    JsonOption,
    MilvusIndexOption,
    MilvusUriOption,
    ModelOrDefaultOption,
    NlistOption,
    NprobeOption,
    PcaDimOption,
    PqMOption,
    PrecisionOption,
    QuietOption,
    RerankOption,
    ShardsOption,
    StoreOption,
)
from .render import display_path, err, handle_errors, out, print_json, progress_bar


def _read_queries(source: str) -> list[str]:
    from hsl.errors import HSLUsageError, os_error_message

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise HSLUsageError(os_error_message(exc, "--queries")) from None
    except UnicodeDecodeError:
        raise HSLUsageError(f"--queries {source}: not UTF-8 text; give one query per line") from None
    return [line for line in text.splitlines() if line.strip()]


@app.command()
@handle_errors
def query(
    text: Annotated[str | None, typer.Argument(help="What the shopper types, e.g. 'red floral summer dress'.")]
    = None,
    store: StoreOption = Path("catalog.h5"),
    model: ModelOrDefaultOption = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Results per query.")] = TOP_K,
    where: Annotated[list[str] | None, typer.Option(help="Filter: COLUMN=VALUE (repeatable).")] = None,
    queries: Annotated[str | None, typer.Option(help="A file of queries, one per line ('-': stdin).")] = None,
    html: Annotated[Path | None, typer.Option(help="Also write a self-contained HTML page of the results.")] = None,
    backend: BackendOption = SEARCH_BACKEND,
    nprobe: NprobeOption = NPROBE,
    ef_search: EfSearchOption = EF_SEARCH,
    nlist: NlistOption = IVFPQOptions.nlist,
    pq_m: PqMOption = IVFPQOptions.m,
    pca_dim: PcaDimOption = IVFPQOptions.dim,
    rerank: RerankOption = IVFPQOptions.rerank,
    shards: ShardsOption = IVFPQOptions.shards,
    milvus_uri: MilvusUriOption = None,
    milvus_index: MilvusIndexOption = MILVUS_INDEX,
    device: DeviceOption = DEVICE,
    precision: PrecisionOption = PRECISION,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Search a store with words; prints the best products (a table, or JSON with --json)."""
    from hsl.errors import HSLUsageError
    from hsl.search import Searcher, parse_where

    if (text is None) == (queries is None):
        raise HSLUsageError("give a query text or --queries FILE (not both)")
    texts = _read_queries(queries) if queries else [text]
    filters = parse_where(where or [])
    if html:
        from hsl.html import check_destination

        check_destination(html)  # before the index is built: a bad path costs nothing
    with progress_bar("indexing", quiet, unit="products") as progress:
        searcher = Searcher(store, model, device=device, progress=progress, backend=backend, nprobe=nprobe,
                            ef_search=ef_search, ivfpq=_ivfpq(nlist, pq_m, pca_dim, rerank, shards),
                            precision=precision, milvus=milvus_options(milvus_uri, milvus_index, nprobe, ef_search))
    results = [searcher.search(t, top_k=top_k, where=filters) for t in texts]
    if model is None and not quiet:  # after the search: a bad --where is then the only line on stderr
        err.print(f"using the default model ({display_path(searcher.model_dir)})", highlight=False)
    for result in results:
        for warning in result.warnings:
            err.print(f"[yellow]warning:[/yellow] {warning}")
    if html:
        from hsl.html import write_page

        write_page(results, html)
        if not quiet:
            err.print(f"wrote {html}: open it in a browser to see the photos", highlight=False)
    if json_output:
        for result in results:
            print_json({"query": result.query, "model": str(searcher.model_dir), "store": str(store),
                        "results": [hit.__dict__ for hit in result.hits]})
        return
    for result in results:
        _print_table(result)
    if not html and not quiet and any(result.hits for result in results):
        hint = _html_hint(text, queries, store, model, top_k, where or [])
        err.print(f"to see the photos: {hint}", highlight=False, soft_wrap=True)


def _html_hint(text: str | None, queries: str | None, store: Path, model: Path | None, top_k: int,
               where: list[str]) -> str:
    """The same search plus --html page.html: the next step, ready to paste."""
    import shlex
    import shutil

    # `make demo` runs .venv/bin/hsl without an activated venv: then that path is what the user can type.
    program = "hsl" if shutil.which("hsl") or not sys.argv[0].endswith("hsl") else display_path(sys.argv[0])
    words = [program, "query", *([text] if queries is None else ["--queries", queries]), "--store", str(store)]
    words += ["--model", str(model)] if model else []
    words += [word for clause in where for word in ("--where", clause)]
    words += ["--top-k", str(top_k)] if top_k != TOP_K else []
    return " ".join(shlex.quote(word) for word in [*words, "--html", "page.html"])


def _ivfpq(nlist: int, m: int, dim: int, rerank: int, shards: int) -> IVFPQOptions:
    return IVFPQOptions(nlist=nlist, m=m, dim=dim, rerank=rerank, shards=shards)  # checked against the index


def milvus_options(uri: str | None, index: str, nprobe: int = NPROBE, ef_search: int = EF_SEARCH) -> object:
    """--milvus-* options; a cluster's shards and replicas come from HSL_MILVUS_SHARDS / HSL_MILVUS_REPLICAS."""
    import os

    from hsl.errors import HSLUsageError
    from hsl.milvus import MilvusOptions

    counts = {}
    for name in ("shards", "replicas"):
        text = os.environ.get(f"HSL_MILVUS_{name.upper()}", "1")
        if not text.strip().isdigit():
            raise HSLUsageError(f"HSL_MILVUS_{name.upper()} must be a positive integer, not {text!r}")
        counts[name] = int(text)
    return MilvusOptions(uri=uri, index=index, nprobe=nprobe, ef_search=ef_search, **counts)  # checked when used


def _print_table(result: object) -> None:
    table = Table(title=f"“{result.query}”", title_justify="left")
    for name, justify in (("#", "right"), ("score", "right"), ("id", "left"), ("title", "left"),
                          ("attributes", "left"), ("image", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for hit in result.hits:
        attributes = ", ".join(v for v in list(hit.attributes.values())[:4] if v)
        table.add_row(str(hit.rank), f"{hit.score:.3f}", hit.id, hit.text, attributes, display_path(hit.image))
    if not result.hits:
        out.print(f"no products match “{result.query}” with these filters", highlight=False)
        return
    out.print(table)


@app.command()
@handle_errors
def index(
    store: StoreOption = Path("catalog.h5"),
    model: ModelOrDefaultOption = None,
    backend: BackendOption = SEARCH_BACKEND,
    nlist: NlistOption = IVFPQOptions.nlist,
    pq_m: PqMOption = IVFPQOptions.m,
    pca_dim: PcaDimOption = IVFPQOptions.dim,
    shards: ShardsOption = IVFPQOptions.shards,
    milvus_uri: MilvusUriOption = None,
    milvus_index: MilvusIndexOption = MILVUS_INDEX,
    device: DeviceOption = DEVICE,
    precision: PrecisionOption = PRECISION,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Compute the image side of HSL for every product once (queries build it when missing)."""
    from hsl.search import Searcher

    with progress_bar("indexing", quiet, unit="products") as progress:
        searcher = Searcher(store, model, device=device, progress=progress, backend=backend,
                            ivfpq=_ivfpq(nlist, pq_m, pca_dim, IVFPQOptions.rerank, shards), precision=precision,
                            milvus=milvus_options(milvus_uri, milvus_index))
    payload = {"store": str(store), "model": str(searcher.model_dir), "products": len(searcher.rows),
               "backend": searcher.index.backend, "exact_inner_product": searcher.config.exact_by_inner_product,
               "precision": searcher.precision.name}
    report = getattr(searcher.index, "report", None)  # milvus: what the sync sent
    if report is not None:
        payload["milvus"] = {"uri": searcher.index.uri, "collection": searcher.index.collection,
                             "index": searcher.index.index_type, **report.__dict__}
    if json_output:
        print_json(payload)
        return
    out.print(f"{payload['backend']} index of {payload['products']} products ready", highlight=False)
    if report is not None:
        change = "already in sync" if report.skipped else f"{report.upserted} upserted, {report.deleted} deleted"
        out.print(f"collection {searcher.index.collection} at {searcher.index.uri}: {change}", highlight=False)
