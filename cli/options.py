"""Option aliases shared by several commands, so each is spelled and documented once, and the one
table from the library's parameter names to this CLI's words for them (`FLAGS`)."""

from pathlib import Path
from typing import Annotated

import typer

StoreOption = Annotated[Path, typer.Option("--store", "-s", help="HDF5 feature store file.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
# Two different --model options: search commands fall back on the shipped model, `hsl eval` needs one.
ModelOrDefaultOption = Annotated[Path | None, typer.Option("--model", "-m",
                                                           help="Model folder (default: the shipped one).")]
TrainedModelOption = Annotated[Path, typer.Option("--model", "-m", help="Trained model folder.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
PrecisionOption = Annotated[str, typer.Option(
    "--precision", help="auto (bf16 on CPUs with native bf16, else fp32: on CUDA float32 measured fastest), "
    "fp32, bf16 or fp16.")]
BatchOption = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Items per forward pass.")]
BackendOption = Annotated[str, typer.Option(
    envvar="HSL_BACKEND", help="Search index: auto, exact, flat (faiss), ivf, hnsw or ivfpq (approximate; ivfpq "
    "for 10M+ products), or milvus (a Milvus collection: --milvus-uri).")]
NprobeOption = Annotated[int, typer.Option(min=1, help="ivf, ivfpq: clusters visited per query (and shard).")]
NlistOption = Annotated[int, typer.Option(help="ivfpq: clusters per shard (0: a power of two near sqrt(products)).")]
PqMOption = Annotated[int, typer.Option("--pq-m", help="ivfpq: bytes of product-quantised code per product.")]
PcaDimOption = Annotated[int, typer.Option(help="ivfpq: PCA dimension before quantisation (0: none).")]
RerankOption = Annotated[int, typer.Option(help="ivfpq: candidates per shard re-scored exactly from disk.")]
ShardsOption = Annotated[int, typer.Option(help="ivfpq: index files the products are split into.")]
EfSearchOption = Annotated[int, typer.Option(min=1, help="hnsw: candidate list size per query.")]
MilvusUriOption = Annotated[str | None, typer.Option(
    envvar="HSL_MILVUS_URI", help="milvus: http://HOST:19530 (Milvus standalone or cluster) or a local path "
    "ending in .db (Milvus Lite, embedded). Default: STORE.index/milvus.db.")]
MilvusIndexOption = Annotated[str, typer.Option(
    envvar="HSL_MILVUS_INDEX", help="milvus: the collection's index: auto (HNSW), HNSW, IVF_FLAT, IVF_SQ8, IVF_PQ, "
    "DISKANN (cluster only) or FLAT (exhaustive).")]

# The library names the parameter at fault in its errors (hsl/errors.py); the CLI words it with its own flag.
FLAGS: dict[str, str] = {
    "answers": "--answers", "backbone": "--backbone", "backend": "--backend", "batch_size": "--batch-size",
    "config": "--config", "device": "--device", "grid": "--grid", "hierarchy": "--hierarchy", "host": "--host",
    "html": "--html", "max_boxes": "--max-boxes", "max_products": "--max-products",
    "max_text_tokens": "--max-text-tokens", "member_processes": "--member-processes",
    "milvus.index": "--milvus-index", "milvus.uri": "--milvus-uri",
    "model": "--model", "nprobe": "--nprobe", "out": "--out", "port": "--port", "precision": "--precision",
    "queries": "--queries", "query": "the query", "resume": "--resume", "seed": "--seed", "split": "--split",
    "store": "--store", "text_column": "--text-column", "top_k": "--top-k", "val_fraction": "--val-fraction",
    "where": "--where", "workers": "--workers",
    "ivfpq.dim": "--pca-dim", "ivfpq.m": "--pq-m", "ivfpq.nlist": "--nlist", "ivfpq.rerank": "--rerank",
    "ivfpq.shards": "--shards",
}
