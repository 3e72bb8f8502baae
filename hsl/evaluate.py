"""`hsl eval`: rank a gallery of products for each query and score the rankings.

Queries are either each product's own title (instance retrieval: Recall@K, MRR@10, ...) or a JSONL
file of free-text queries with relevant ids (binary) or attributes (graded relevance = share of
the named attributes a product matches).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .dataset import Products, Split, load_products
from .errors import HSLError, HSLUsageError, os_error_message
from .masks import token_mask
from .metrics import graded_ndcg_at_k, hierarchical_precision_at_k, summarize
from .model_files import check_backbone
from .options import DEVICE, EVAL_BACKEND, EVAL_SPLIT, PRECISION
from .precision import resolve_precision
from .top_k import top_k_rows

if TYPE_CHECKING:
    from .milvus import MilvusOptions

_BLOCK = 256  # queries or gallery images per block: bounds memory of the [Bq, Bi, R] object scores


_QUERY_BLOCK = 8 * _BLOCK  # queries whose text encodings are held while the gallery streams past them
QueryBatch = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (start, stop) -> tokens, token mask


def in_memory_queries(tokens: torch.Tensor, token_mask: torch.Tensor) -> QueryBatch:
    return lambda start, stop: (tokens[start:stop], token_mask[start:stop])


def title_queries(products: Products) -> QueryBatch:
    """Each product's own title as a query, read from the store a block at a time when not in memory."""
    if products.source is None:
        return in_memory_queries(products.tokens, products.token_mask)
    return lambda start, stop: products.source.read(np.arange(start, stop), image=False)[2:]


@torch.no_grad()
def rank_top(model: torch.nn.Module, gallery: Products, queries: QueryBatch, n_queries: int, device: torch.device,
             k: int = 10) -> np.ndarray:
    """[Q, min(k, N)] gallery positions of each query's k best by the model's total score (the exact HSL
    score; with a members' index_dim, the projected one that search ranks by), best first, ties in
    store order (hsl/top_k.py). Memory does not grow with the gallery: it is encoded a block at a time
    (read from the store where it is not in memory) against up to _QUERY_BLOCK queries, keeping only a
    running top-k; the score tiles are the ones a full [Q, N] matrix would hold, so the ranking is too."""
    model.eval()
    k = min(k, len(gallery))
    out = []
    for q_start in range(0, n_queries, _QUERY_BLOCK):
        q_stop = min(q_start + _QUERY_BLOCK, n_queries)
        texts = []
        for start in range(q_start, q_stop, _BLOCK):
            tokens, mask = queries(start, min(start + _BLOCK, q_stop))
            texts.append(model.encode_text(tokens.to(device).float(), mask.to(device)))
        best_scores = np.full((q_stop - q_start, 0), -np.inf, np.float32)
        best = np.zeros((q_stop - q_start, 0), np.int64)
        for g_start in range(0, len(gallery), _BLOCK):
            index = torch.arange(g_start, min(g_start + _BLOCK, len(gallery)))
            image = model.encode_image(*gallery.image_batch(index, device))
            tile = torch.cat([model.similarities(text, image).total for text in texts]).float().cpu().numpy()
            top = top_k_rows(tile, k)  # [Bq, <=k] within the tile, ties by position
            scores = np.concatenate([best_scores, np.take_along_axis(tile, top, axis=1)], axis=1)
            positions = np.concatenate([best, top + g_start], axis=1)
            order = np.lexsort((positions, -scores), axis=-1)[:, :k]  # best first, then earlier in the store
            best_scores, best = np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)
        out.append(best)
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def rank_products(model: torch.nn.Module, gallery: Products, queries: QueryBatch, n_queries: int,
                  device: torch.device, top_k: int = 10) -> list[list[str]]:
    top = rank_top(model, gallery, queries, n_queries, device, top_k)
    return [[gallery.ids[j] for j in row] for row in top.tolist()]


@dataclass
class Queries:
    texts: list[str]
    relevant: list[set[str]] | None = None
    attributes: list[dict[str, str]] | None = None


def read_queries(path: str | os.PathLike) -> Queries:
    """JSONL: {"query": ..., "relevant": [ids]} or {"query": ..., "attributes": {column: value}}."""
    texts, relevant, attributes = [], [], []
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise HSLUsageError(os_error_message(exc, "`queries`"), "queries", os.fspath(path)) from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HSLUsageError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or not str(row.get("query", "")).strip():
                raise HSLUsageError(f"{path}:{number}: each line needs a non-empty \"query\"")
            if ("relevant" in row) == ("attributes" in row):
                raise HSLUsageError(f"{path}:{number}: give exactly one of \"relevant\" or \"attributes\"")
            texts.append(str(row["query"]).strip())
            if "relevant" in row:
                relevant.append({str(i) for i in row["relevant"]})
            else:
                attributes.append({str(k): str(v) for k, v in row["attributes"].items()})
    if not texts:
        raise HSLUsageError(f"{path}: no queries")
    if relevant and attributes:
        raise HSLUsageError(f"{path}: mixes \"relevant\" and \"attributes\" lines; use one kind per file")
    return Queries(texts, relevant or None, attributes or None)


def attribute_gains(gallery: Products, wanted: dict[str, str]) -> np.ndarray:
    """[N] share of the query's named attributes that each gallery product matches."""
    for column in wanted:
        if column not in gallery.attributes:
            raise HSLUsageError(f"query attribute {column!r} is not a store column "
                                f"({', '.join(gallery.attributes) or 'none'})")
    matches = [np.array(gallery.attributes[c]) == v for c, v in wanted.items()]
    return np.mean(matches, axis=0) if matches else np.zeros(len(gallery))


def evaluate(store_path: str | os.PathLike, model_dir: str | os.PathLike, queries_path: str | None = None,
             split: str = EVAL_SPLIT, hierarchy: list[str] | None = None, device: str = DEVICE,
             answers_path: str | None = None, precision: str = PRECISION, backend: str = EVAL_BACKEND,
             milvus: MilvusOptions | None = None) -> dict:
    """Metrics of a trained model on a store; see the module docstring for the query kinds.

    With `answers_path` (KDD Cup 2020 valid_answer.json) each query ranks only its own pool (hsl.pools).
    `backend` "exact" scores every query against every gallery product; any other (ivf, hnsw, milvus, ...)
    ranks through that search index as `hsl query` does, restricted to the gallery: its quality as served.
    """
    if answers_path is not None:
        if queries_path is not None:
            raise HSLUsageError("give `queries` or `answers`, not both", "answers", answers_path)
        if backend != "exact":
            raise HSLUsageError("`answers` ranks each query's own pool of candidates exactly; leave out `backend`",
                                "backend", backend, ["exact"])
        from .pools import evaluate_pools

        return evaluate_pools(store_path, model_dir, answers_path, device=device, precision=precision)
    from .factory import load_model
    from .store import FeatureStore

    model, meta = load_model(model_dir)
    torch_device = torch.device(device)
    resolved = resolve_precision(precision, torch_device)
    model.to(torch_device).use_precision(resolved)
    with FeatureStore.open(store_path) as store:
        check_backbone(store, meta, str(model_dir))
        products = load_products(store, require_text=queries_path is None, region_grid=model.config.region_grid,
                                 in_memory=False)
        max_text_tokens = int(store.meta["max_text_tokens"])
    # The scored split stays in the store (products.source): its features are read a block at a time.
    gallery = _split_products(products, meta, split)
    k = 10
    by_index = None if backend == "exact" else IndexRanker(store_path, model_dir, gallery, torch_device, precision,
                                                           backend, milvus)
    if queries_path is None:
        titles = title_queries(gallery)
        if by_index:
            ranked = [[gallery.ids[j] for j in row] for row in by_index.top(titles, len(gallery), k)]
        else:
            ranked = rank_products(model, gallery, titles, len(gallery), torch_device, top_k=k)
        relevant = [{i} for i in gallery.ids]
        metrics = summarize(ranked, relevant, depth=k)
        query_paths = None if not hierarchy else [_path(gallery, hierarchy, i) for i in range(len(gallery))]
    else:
        queries = read_queries(queries_path)
        tokens, mask = encode_query_texts(meta["backbone"], queries.texts, max_text_tokens, precision)
        if by_index:
            top = by_index.top(in_memory_queries(tokens, mask), len(tokens), k)
        else:
            top = rank_top(model, gallery, in_memory_queries(tokens, mask), len(tokens), torch_device, k).tolist()
        ranked = [[gallery.ids[j] for j in row] for row in top]
        metrics = {}
        if queries.relevant is not None:
            metrics = summarize(ranked, queries.relevant, depth=k)
        else:
            gains = [attribute_gains(gallery, wanted) for wanted in queries.attributes]
            ranked_gains = [[g[j] for j in row] for g, row in zip(gains, top, strict=True)]
            metrics["gNDCG@10"] = graded_ndcg_at_k(ranked_gains, [np.sort(g)[::-1][:k].tolist() for g in gains], k)
        query_paths = _query_paths(queries, hierarchy)
    if hierarchy and query_paths is not None:
        index = {pid: i for i, pid in enumerate(gallery.ids)}
        ranked_paths = [[_path(gallery, hierarchy, index[pid]) for pid in row] for row in ranked]
        for cut in (1, 5, 10):
            metrics[f"HP@{cut}"] = hierarchical_precision_at_k(ranked_paths, query_paths, cut)
    if queries_path is None:  # titles of the gallery are the text side: the HUSE classifier's accuracy
        metrics.update(_huse_accuracy(model, model_dir, gallery, torch_device))
    return {"metrics": {key: round(float(v), 6) for key, v in metrics.items()}, "queries": len(ranked),
            "gallery": len(gallery), "split": split if split != "auto" else _auto_split(meta),
            "precision": resolved.name}


class IndexRanker:
    """Top-k gallery indices per query through a search backend (Searcher.rank): the index's candidates,
    filtered to the gallery products, re-scored as `hsl query` re-scores them."""

    def __init__(self, store_path: str | os.PathLike, model_dir: str | os.PathLike, gallery: Products,
                 device: torch.device, precision: str, backend: str, milvus: MilvusOptions | None) -> None:
        from .search import Searcher
        from .store import FeatureStore

        self.searcher = Searcher(store_path, model_dir, device=str(device), backend=backend, precision=precision,
                                 milvus=milvus)
        with FeatureStore.open(store_path) as store:
            index_ids = store.strings("ids", self.searcher.rows)
        where = {pid: j for j, pid in enumerate(gallery.ids)}
        self.gallery_of = np.array([where.get(pid, -1) for pid in index_ids], dtype=np.int64)  # [N] or -1
        self.allowed = None if (self.gallery_of >= 0).all() else self.gallery_of >= 0
        self.device = device

    @torch.no_grad()
    def top(self, queries: QueryBatch, n_queries: int, k: int) -> list[list[int]]:
        model = self.searcher.model
        rows = []
        for i in range(n_queries):  # one query at a time, as served
            tokens, mask = queries(i, i + 1)
            text = model.encode_text(tokens.to(self.device).float(), mask.to(self.device))
            positions, _ = self.searcher.rank(text, k, self.allowed)
            rows.append(self.gallery_of[positions].tolist())
        return rows


def _query_paths(queries: Queries, hierarchy: list[str] | None) -> list[tuple[str, ...]] | None:
    """Category paths of attribute queries: the hierarchy columns each names, root first, up to the first
    it leaves out. None (no HP@K) unless every query names at least the root: a query that names only a
    leaf has no path of its own, and inferring one from the catalog would grade what the query never said."""
    if not hierarchy or queries.attributes is None:
        return None
    paths = []
    for wanted in queries.attributes:
        path = []
        for column in hierarchy:
            if column not in wanted:
                break
            path.append(wanted[column])
        if not path:
            return None
        paths.append(tuple(path))
    return paths


def _huse_accuracy(model: torch.nn.Module, model_dir: str | os.PathLike, gallery: Products,
                   device: torch.device) -> dict[str, float]:
    """acc_image / acc_text of the shared HUSE classifier when the model folder has one, else nothing."""
    from .objectives import classification_accuracy, load_heads

    heads = load_heads(model_dir, model.config)
    if heads is None or "huse" not in heads[0]:
        return {}
    huse = heads[0]["huse"].to(device)
    if huse.class_column not in gallery.attributes:
        return {}
    return classification_accuracy(model, huse, gallery, heads[1].vocab[huse.class_column], device)


def _path(products: Products, hierarchy: list[str], i: int) -> tuple[str, ...]:
    missing = [c for c in hierarchy if c not in products.attributes]
    if missing:
        raise HSLUsageError(f"`hierarchy` column {missing[0]!r} is not a store column", "hierarchy", missing[0],
                            list(products.attributes))
    return tuple(products.attributes[c][i] for c in hierarchy)


SPLITS = ("auto", "all", "train", "val", "test")


def _auto_split(meta: dict) -> str:
    return "test" if meta.get("split", {}).get("test_fraction", 0) > 0 else "all"


def _split_products(products: Products, meta: dict, split: str) -> Products:
    """The products of one side of the model's own split ("auto": its test split if it has one)."""
    split = _auto_split(meta) if split == "auto" else split
    if split == "all":
        return products
    if split not in ("train", "val", "test"):
        raise HSLUsageError(f"`split` must be auto, all, train, val or test, not {split!r}", "split", split,
                            SPLITS)
    saved = meta.get("split")
    if not saved:
        raise HSLUsageError("this model records no split; use `split` all", "split", split, ["all"])
    chosen = products.subset(Split(**saved).indices(products.ids)[split])
    if len(chosen) == 0:
        raise HSLError(f"the store holds no products of the model's {split} split")
    return chosen


def encode_query_texts(backbone_name: str, texts: list[str], max_text_tokens: int,
                       precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Free-text queries -> (tokens [Q,T,Dt], mask [Q,T]) with the store's text backbone (on the CPU)."""
    from .backbones import create_text_encoder

    backbone = create_text_encoder(backbone_name, max_text_tokens=max_text_tokens)
    backbone.use_precision(resolve_precision(precision, "cpu"))
    features = backbone.encode_texts(texts)
    return features.tokens.cpu(), token_mask(features.lengths.cpu(), features.tokens.shape[1])
