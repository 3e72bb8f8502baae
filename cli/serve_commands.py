"""`hsl serve`: the search page and the JSON API over a store, on this machine by default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hsl.options import DEVICE, MILVUS_INDEX, PRECISION, SEARCH_BACKEND

from .app import app
from .options import (
    BackendOption,
    DeviceOption,
    MilvusIndexOption,
    MilvusUriOption,
    ModelOrDefaultOption,
    PrecisionOption,
    QuietOption,
    StoreOption,
)
from .render import display_path, err, handle_errors, progress_bar
from .search_commands import milvus_options


@app.command()
@handle_errors
def serve(
    store: StoreOption = Path("catalog.h5"),
    model: ModelOrDefaultOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8000,
    backend: BackendOption = SEARCH_BACKEND,
    milvus_uri: MilvusUriOption = None,
    milvus_index: MilvusIndexOption = MILVUS_INDEX,
    device: DeviceOption = DEVICE,
    precision: PrecisionOption = PRECISION,
    quiet: QuietOption = False,
) -> None:
    """Serve a search page at / and a JSON API (OpenAPI at /docs) until Ctrl-C."""
    from hsl.serve import Catalog
    from hsl.serve_api import serve_catalog

    with progress_bar("indexing", quiet, unit="products") as progress:
        catalog = Catalog(store, model, device=device, backend=backend, progress=progress, precision=precision,
                          milvus=milvus_options(milvus_uri, milvus_index))
    if model is None and not quiet:
        err.print(f"using the default model ({display_path(catalog.searcher.model_dir)})", highlight=False)

    def ready(url: str) -> None:
        err.print(f"listening on {url} ({len(catalog)} products; API docs at {url}/docs; Ctrl-C stops)",
                  highlight=False, soft_wrap=True)

    serve_catalog(catalog, host, port, access_log=not quiet, ready=ready)
