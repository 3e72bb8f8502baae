"""Option aliases shared by several commands, so each is spelled and documented once."""

from pathlib import Path
from typing import Annotated

import typer

StoreOption = Annotated[Path, typer.Option("--store", "-s", help="HDF5 feature store file.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
BatchOption = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Items per forward pass.")]
BackendOption = Annotated[str, typer.Option(help="Search index: auto, exact, flat (faiss), ivf or hnsw (approximate).")]
NprobeOption = Annotated[int, typer.Option(min=1, help="ivf: clusters visited per query.")]
EfSearchOption = Annotated[int, typer.Option(min=1, help="hnsw: candidate list size per query.")]
