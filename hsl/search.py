"""`hsl query`: rank a store's products for a shopper's words with a trained HSL model.

The image side comes from the cached index (hsl/index.py). A query costs one text encoding and
one inner product per product; with AGG = max | topk the inner product gathers candidates that
are then re-ranked with the exact HSL score. With a current index, the default text tower on the
CPU and AGG = mean, a query runs in numpy alone (hsl/query_text.py): torch, whose import is most
of a cold start, is loaded only to build the index, re-rank, or encode with another backbone.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .ann import IVFPQOptions, best_exact
from .errors import HSLError, HSLUsageError, StoreMismatchError
from .hit_records import HitRecords
from .index import VectorSearch
from .index_cache import refresh_index
from .model_files import check_backbone, model_hash, read_config
from .options import DEVICE, EF_SEARCH, NPROBE, PRECISION, RERANK_POOL, SEARCH_BACKEND, TOP_K
from .precision import resolve_precision
from .query_text import unfamiliar_words
from .store import FeatureStore

if TYPE_CHECKING:
    import torch

    from .milvus import MilvusOptions
    from .model import HSLModel, TextEncoding

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default"
MAX_QUERY_CHARS = 1000  # far past any title; longer input is truncated with a warning


@dataclass
class Hit:
    rank: int
    id: str
    score: float
    image: str
    text: str
    attributes: dict[str, str]


@dataclass
class SearchResult:
    query: str
    hits: list[Hit]
    warnings: list[str] = field(default_factory=list)


def parse_where(clauses: list[str]) -> dict[str, str]:
    """["gender=Women", "baseColour=Red"] -> {"gender": "Women", "baseColour": "Red"}."""
    where = {}
    for clause in clauses:
        key, sep, value = clause.partition("=")
        if not sep or not key.strip():
            raise HSLUsageError(f"`where` {clause!r}: write it as COLUMN=VALUE, e.g. gender=Women", "where", clause)
        where[key.strip()] = value.strip()
    return where


class AttributeFilter:
    """Attribute columns for COLUMN=VALUE filters: values match ignoring case ("women" finds "Women"), and a
    column or value that no product has is a usage error listing what the store does have."""

    MAX_LISTED = 20  # values named in an error; a column with more (articleType: ~140) ends with "and N more"

    def __init__(self, attributes: dict[str, np.ndarray]) -> None:
        self.values = attributes  # {column: [N] object array of strings}
        self._folded: dict[str, np.ndarray] = {}

    def mask(self, where: dict[str, str]) -> np.ndarray:
        """[N] bool of the products matching every clause."""
        count = len(next(iter(self.values.values()))) if self.values else 0
        keep = np.ones(count, dtype=bool)
        for column, value in where.items():
            clause = f"{column}={value}"
            if not self.values:
                raise HSLUsageError(f"`where` {clause}: the store has no attribute columns (they come from "
                                    "a manifest's columns besides id, image and title); search without it",
                                    "where", clause, [])
            if column not in self.values:
                raise HSLUsageError(f"`where` {clause}: no such attribute column; the store has "
                                    f"{', '.join(self.values)}", "where", clause, list(self.values))
            if column not in self._folded:
                self._folded[column] = np.array([v.casefold() for v in self.values[column]], dtype=object)
            match = self._folded[column] == value.casefold()
            if not match.any():
                raise HSLUsageError(f"`where` {clause}: no product has it{self._suggest(column, value)}; "
                                    f"{column} has {self.listing(column)}", "where", clause)
            keep &= match
        return keep

    def stored_values(self, where: dict[str, str]) -> dict[str, list[str]]:
        """{column: the stored spellings of each value} ("women" -> ["Women"]), for a search engine's own
        filter (hsl/milvus.py); checked as mask() checks, with the same errors."""
        self.mask(where)  # fills self._folded for these columns
        return {column: np.unique(self.values[column][self._folded[column] == value.casefold()]).tolist()
                for column, value in where.items()}

    def _suggest(self, column: str, value: str) -> str:
        """ " (did you mean Women?)" for a near miss such as "Woman", else nothing."""
        import difflib

        names = {v.casefold(): v for v in self.values[column].tolist() if v}
        close = difflib.get_close_matches(value.casefold(), list(names), n=1)
        return f" (did you mean {names[close[0]]}?)" if close else ""

    def listing(self, column: str) -> str:
        """The column's values, most frequent first: "Men, Women, Boys, Girls, Unisex"."""
        counts = Counter(v for v in self.values[column].tolist() if v)
        names = [v for v, _ in counts.most_common()]
        if not names:
            return "no values"
        more = len(names) - self.MAX_LISTED
        return ", ".join(names[:self.MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def clean_query(text: str) -> tuple[str, list[str]]:
    """Strip control characters and whitespace; refuse an empty query; truncate a huge one."""
    cleaned = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if not cleaned:
        raise HSLUsageError("`query` is empty: give some words, e.g. red summer dress", "query", text)
    if len(cleaned) > MAX_QUERY_CHARS:
        return cleaned[:MAX_QUERY_CHARS], [f"query truncated from {len(cleaned)} to {MAX_QUERY_CHARS} characters"]
    return cleaned, []


class CatalogStrings:
    """Every index position's id, title, photo path and attributes in memory (`hsl serve`): hits and
    filters without a store read. A position an update dropped has empty strings."""

    def __init__(self, store: FeatureStore, rows: np.ndarray) -> None:
        self.columns: list[str] = list(store.meta["attribute_columns"])
        self.ids = store.strings("ids", rows)  # [N] product id of each index position
        self.texts = store.strings("texts", rows)
        self.images = store.strings("images", rows)
        self.attributes = AttributeFilter({c: np.array(v, dtype=object) for c, v in store.attributes(rows).items()})

    def record(self, i: int) -> dict:
        return {"id": self.ids[i], "image": self.images[i], "text": self.texts[i],
                "attributes": {c: str(self.attributes.values[c][i]) for c in self.columns}}


class Searcher:
    """The search session: model, query text encoder, index and (with `keep_strings`) the catalog's
    strings, loaded once; `hsl query` and `hsl serve` answer every query through one."""

    def __init__(self, store_path: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 device: str = DEVICE, progress: Callable[[int, int], None] | None = None,
                 backend: str = SEARCH_BACKEND, nprobe: int = NPROBE, ef_search: int = EF_SEARCH,
                 ivfpq: IVFPQOptions | None = None, precision: str = PRECISION, keep_strings: bool = False,
                 milvus: MilvusOptions | None = None) -> None:
        self.store_path = Path(store_path)
        self.device = _resolve_device(device)  # before any work: a missing GPU is one clear line, not a traceback
        self.precision = resolve_precision(precision, self.device)
        self.model_dir = Path(model_dir) if model_dir else DEFAULT_MODEL
        with FeatureStore.open(self.store_path) as store:
            self.store_meta = dict(store.meta)
            if model_dir is None:
                self._check_default_model()
            self.config, self.model_meta = read_config(self.model_dir)
            check_backbone(store, self.model_meta, str(self.model_dir))
            self.model_key = model_hash(self.model_dir)
            self._model: HSLModel | None = None
            self._text_encoder = None
            self._query_text = None
            self._attributes: AttributeFilter | None = None
            self._store: FeatureStore | None = None
            path = refresh_index(self.store_path, lambda: self.model, self.model_key, self.precision.name, progress,
                                 store)  # the store opened once for a query
        if backend == "milvus":  # a Milvus collection that follows the index cache (hsl/milvus.py)
            from .milvus import MilvusSearch

            self.index = MilvusSearch(path, self.store_path, self.model_key, milvus, progress)
        else:
            self.index = VectorSearch(path, backend, nprobe, ef_search, ivfpq)
        self.rows = self.index.rows  # [N] store row of each index vector (-1: dropped, never a result)
        # the hits' strings, packed beside the vectors (hsl/hit_records.py)
        self.records = HitRecords(path, str(self.store_meta.get("strings_id", "")))
        self.strings: CatalogStrings | None = None
        if keep_strings:
            with FeatureStore.open(self.store_path) as store:
                self.strings = CatalogStrings(store, self.rows)
            self._attributes = self.strings.attributes

    @property
    def model(self) -> HSLModel:
        """The torch model, loaded on first use (index building, re-ranking, other text backbones)."""
        if self._model is None:
            from .factory import load_model

            self._model, _ = load_model(self.model_dir)
            self._model.to(self.device).eval().use_precision(self.precision)
        return self._model

    @property
    def numpy_queries(self) -> bool:
        """Whether a query's text side runs in numpy (hsl/query_text.py) rather than torch."""
        from .query_text import supports

        return self.config.exact_by_inner_product and supports(self.store_meta["backbone"], self.device)

    def _check_default_model(self) -> None:
        import json

        config = self.model_dir / "config.json"
        if not config.is_file():
            raise HSLError(f"no default model is installed at {self.model_dir}; give the `model` folder of a "
                           "training run", "model")
        backbone = json.loads(config.read_text())["meta"]["backbone"]
        if backbone != self.store_meta["backbone"]:
            raise StoreMismatchError(
                f"the default model is for backbone {backbone!r}, store {self.store_path} was extracted with "
                f"{self.store_meta['backbone']!r}; train a model on it and give its folder as `model`", "model")

    def query_vector(self, text: str) -> tuple[np.ndarray, TextEncoding | None]:
        """(the query's index-space vector [D_idx] float32, its torch encoding when it was made with torch)."""
        if self.numpy_queries:
            if self._query_text is None:
                from .query_text import load_query_text

                self._query_text = load_query_text(self.model_dir, self.config, self.store_meta["max_text_tokens"])
            return self._query_text(text), None
        import torch

        with torch.no_grad():
            text_enc = self.model.encode_text(*self._encode_query(text))
            return self.model.query_vectors(text_enc)[0].cpu().numpy(), text_enc

    def language_warnings(self, text: str) -> list[str]:
        """A warning when most of the query's words are unknown to the English text model and to the catalog."""
        if self._query_text is None:  # other text towers (OpenCLIP, tiny): no vocabulary to judge by
            return []
        catalog = self.records.vocabulary()  # None: a cache made before it (then only the model's words count)
        unknown = unfamiliar_words(text, self._query_text.encoder.vocabulary, catalog)
        if not unknown:
            return []
        where = "" if catalog is None else ", nor words of this catalog's titles"
        return [f"{', '.join(unknown[:5])}: not English words the text model (all-MiniLM-L6-v2) knows{where}; "
                "it reads English, so results may be unrelated: try the query in English"]

    def _encode_query(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        from .masks import token_mask  # torch: only a query that runs the torch text side imports it

        if self._text_encoder is None:
            from .backbones import create_text_encoder

            self._text_encoder = create_text_encoder(self.store_meta["backbone"],
                                                     max_text_tokens=self.store_meta["max_text_tokens"])
            self._text_encoder.to(self.device).use_precision(self.precision)
        features = self._text_encoder.encode_texts([text])
        mask = token_mask(features.lengths, features.tokens.shape[1])  # [1,T]
        return features.tokens.to(self.device), mask.to(self.device)

    def _attribute_mask(self, where: dict[str, str]) -> np.ndarray:
        if self._attributes is None:
            with FeatureStore.open(self.store_path) as store:
                self._attributes = AttributeFilter({k: np.array(v, dtype=object)
                                                    for k, v in store.attributes(self.rows).items()})
        return self._attributes.mask(where)

    def engine_filter(self, where: dict[str, str] | None) -> dict:
        """Keyword arguments that hand `where` to an index that filters inside its engine (Milvus), else {}."""
        if not where or not getattr(self.index, "filters_in_engine", False):
            return {}
        if self._attributes is None:
            self._attribute_mask(where)  # reads the attribute columns once
        return {"where": self._attributes.stored_values(where)}

    def search(self, query: str, top_k: int = TOP_K, where: dict[str, str] | None = None) -> SearchResult:
        if top_k < 1:
            raise HSLUsageError(f"`top_k` must be at least 1, got {top_k}", "top_k", top_k)
        text, warnings = clean_query(query)
        q, text_enc = self.query_vector(text)
        warnings += self.language_warnings(text)
        allowed = self._attribute_mask(where) if where else None
        positions, scores = self.rank(text_enc, top_k, allowed, self.engine_filter(where), query_vector=q)
        return SearchResult(text, self.hits(positions, scores), warnings)

    def rank(self, text_enc: TextEncoding | None, top_k: int, allowed: np.ndarray | None = None,
             engine_filter: dict | None = None, query_vector: np.ndarray | None = None,
             ) -> tuple[np.ndarray, np.ndarray]:
        """(index positions, HSL scores) of the top_k products for one query, best first: its torch encoding,
        or (numpy path) its query vector, which AGG = mean needs alone."""
        if query_vector is None:
            query_vector = self.model.query_vectors(text_enc)[0].detach().cpu().numpy()  # [D]
        exact = self.config.exact_by_inner_product  # else: inner products only gather candidates
        positions, scores = self.index.search(query_vector, top_k if exact else max(top_k, RERANK_POOL),
                                              allowed, **(engine_filter or {}))
        if not exact and len(positions):
            scores = self._exact_scores(text_enc, positions)
            positions, scores = best_exact(positions, scores, top_k)  # equal scores in store order
        return positions, scores

    def _exact_scores(self, text_enc: TextEncoding, candidates: np.ndarray) -> np.ndarray:
        """Full HSL scores (any AGG) for a few candidate products, from their stored regions."""
        import torch

        from .dataset import load_products

        rows = self.rows[candidates]
        order = np.argsort(rows)
        with FeatureStore.open(self.store_path) as store:
            products = load_products(store, region_grid=self.config.region_grid, rows=rows[order])
        exact = np.empty(len(rows), dtype=np.float32)
        with torch.no_grad():
            image = self.model.encode_image(*products.image_batch(torch.arange(len(products)), self.device))
            exact[order] = self.model.similarities(text_enc, image).total[0].cpu().numpy()
        return exact

    def close(self) -> None:
        """Close the index and the store (a Searcher left open is closed with the process)."""
        self.index.close()
        self.records.close()
        if self._store is not None:
            self._store.close()

    def hits(self, positions: np.ndarray, scores: np.ndarray) -> list[Hit]:
        """Ranked hits for index positions, best first."""
        if self.strings is not None:
            records = [self.strings.record(i) for i in positions.tolist()]
        elif (cached := self.records.get(positions)) is not None:
            records = cached
        else:
            if self._store is None:  # one read-only handle for the Searcher's life, not one per query
                self._store = FeatureStore.open(self.store_path)
            records = self._store.row_records(self.rows[positions])
        return [Hit(rank=rank, id=r["id"], score=float(score), image=r["image"], text=r["text"],
                    attributes=r["attributes"])
                for rank, (r, score) in enumerate(zip(records, scores.tolist(), strict=True), start=1)]


def _resolve_device(device: str) -> str:
    """`cpu` needs no torch; anything else (auto, cuda[:N]) is checked by torch, then named as a string."""
    if device == "cpu":
        return device
    from .devices import resolve_device

    return str(resolve_device(device))
