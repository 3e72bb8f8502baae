"""`hsl query`: rank a store's products for a shopper's words with a trained HSL model.

The image side comes from the cached index (hsl/index.py). A query costs one text encoding and
one inner product per product; with AGG = max | topk the inner product gathers candidates that
are then re-ranked with the exact HSL score.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .ann import IVFPQOptions, best_exact
from .dataset import check_backbone, load_products
from .errors import HSLError, HSLUsageError, StoreMismatchError
from .index import VectorSearch, build_index, index_path, is_current, store_fingerprint
from .store import FeatureStore

if TYPE_CHECKING:
    from .milvus import MilvusOptions

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default"
MAX_QUERY_CHARS = 1000  # far past any title; longer input is truncated with a warning
RERANK_CANDIDATES = 200  # AGG = max | topk: exact re-ranking of this many inner-product candidates


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
            raise HSLUsageError(f"--where {clause!r}: write it as COLUMN=VALUE, e.g. gender=Women")
        where[key.strip()] = value.strip()
    return where


class AttributeFilter:
    """Attribute columns for COLUMN=VALUE filters: values match ignoring case ("women" finds "Women"), and a
    column or value that no product has is a usage error listing what the store does have."""

    MAX_LISTED = 20  # values named in an error; a column with more (articleType: ~140) ends with "and N more"

    def __init__(self, attributes: dict[str, np.ndarray]) -> None:
        self.values = attributes  # {column: [N] object array of strings}
        self._folded: dict[str, np.ndarray] = {}

    def mask(self, where: dict[str, str], label: str = "--where ") -> np.ndarray:
        """[N] bool of the products matching every clause; `label` names the option in errors."""
        count = len(next(iter(self.values.values()))) if self.values else 0
        keep = np.ones(count, dtype=bool)
        for column, value in where.items():
            if not self.values:
                raise HSLUsageError(f"{label}{column}={value}: the store has no attribute columns (they come from "
                                    "a manifest's columns besides id, image and title); search without it")
            if column not in self.values:
                raise HSLUsageError(f"{label}{column}={value}: no such attribute column; the store has "
                                    f"{', '.join(self.values)}")
            if column not in self._folded:
                self._folded[column] = np.array([v.casefold() for v in self.values[column]], dtype=object)
            match = self._folded[column] == value.casefold()
            if not match.any():
                raise HSLUsageError(f"{label}{column}={value}: no product has it{self._suggest(column, value)}; "
                                    f"{column} has {self.listing(column)}")
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
        raise HSLUsageError("the query is empty; give some words, e.g. hsl query \"red summer dress\"")
    if len(cleaned) > MAX_QUERY_CHARS:
        return cleaned[:MAX_QUERY_CHARS], [f"query truncated from {len(cleaned)} to {MAX_QUERY_CHARS} characters"]
    return cleaned, []


class Searcher:
    """Loads the model, the query text encoder and the index once; answers many queries."""

    def __init__(self, store_path: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 device: str = "cpu", progress: Callable[[int, int], None] | None = None,
                 backend: str = "auto", nprobe: int = 32, ef_search: int = 128,
                 ivfpq: IVFPQOptions | None = None, precision: str = "auto", milvus: MilvusOptions | None = None
                 ) -> None:
        from .extract import resolve_device
        from .factory import load_model, model_hash
        from .precision import resolve_precision

        self.store_path = Path(store_path)
        self.device = resolve_device(device)  # before any work: a missing GPU is one clear line, not a traceback
        self.precision = resolve_precision(precision, self.device)
        with FeatureStore.open(self.store_path) as store:
            self.store_meta = dict(store.meta)
            fingerprint = store_fingerprint(store)
        self.model_dir = Path(model_dir) if model_dir else DEFAULT_MODEL
        if model_dir is None:
            self._check_default_model()
        self.model, self.model_meta = load_model(self.model_dir)
        self.model.to(self.device).eval().use_precision(self.precision)
        with FeatureStore.open(self.store_path) as store:
            check_backbone(store, self.model_meta, str(self.model_dir))
        self.model_key = model_hash(self.model_dir)
        path = index_path(self.store_path, self.model_key)
        if not is_current(path, fingerprint, self.precision.name):
            build_index(self.store_path, self.model, self.model_key, progress)
        if backend == "milvus":  # a Milvus collection that follows the index cache (hsl/milvus.py)
            from .milvus import MilvusSearch

            self.index = MilvusSearch(path, self.store_path, self.model_key, milvus, progress)
        else:
            self.index = VectorSearch(path, backend, nprobe, ef_search, ivfpq)
        self.rows = self.index.rows  # [N] store row of each index vector
        self._text_encoder = None
        self._attributes: AttributeFilter | None = None

    def _check_default_model(self) -> None:
        import json

        config = self.model_dir / "config.json"
        if not config.is_file():
            raise HSLError(f"no default model is installed at {self.model_dir}; give --model DIR from hsl train")
        backbone = json.loads(config.read_text())["meta"]["backbone"]
        if backbone != self.store_meta["backbone"]:
            raise StoreMismatchError(
                f"the default model is for backbone {backbone!r}, store {self.store_path} was extracted with "
                f"{self.store_meta['backbone']!r}; train a model on it with hsl train and pass --model DIR")

    def _encode_query(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._text_encoder is None:
            from .backbones import create_text_encoder

            self._text_encoder = create_text_encoder(self.store_meta["backbone"],
                                                     max_text_tokens=self.store_meta["max_text_tokens"])
            self._text_encoder.to(self.device).use_precision(self.precision)
        features = self._text_encoder.encode_texts([text])
        lengths = features.lengths.clamp(min=1)
        mask = torch.arange(features.tokens.shape[1], device=lengths.device)[None] < lengths[:, None]  # [1,T]
        return features.tokens, mask

    def _attribute_mask(self, where: dict[str, str]) -> np.ndarray:
        if self._attributes is None:
            with FeatureStore.open(self.store_path) as store:
                self._attributes = AttributeFilter({k: np.array(v, dtype=object)[self.rows]
                                                    for k, v in store.attributes().items()})
        return self._attributes.mask(where)

    def engine_filter(self, where: dict[str, str] | None) -> dict:
        """Keyword arguments that hand --where to an index that filters inside its engine (Milvus), else {}."""
        if not where or not getattr(self.index, "filters_in_engine", False):
            return {}
        if self._attributes is None:
            self._attribute_mask(where)  # reads the attribute columns once
        return {"where": self._attributes.stored_values(where)}

    @torch.no_grad()
    def search(self, query: str, top_k: int = 10, where: dict[str, str] | None = None) -> SearchResult:
        if top_k < 1:
            raise HSLUsageError(f"--top-k must be at least 1, got {top_k}")
        text, warnings = clean_query(query)
        tokens, mask = self._encode_query(text)
        text_enc = self.model.encode_text(tokens.to(self.device), mask.to(self.device))
        allowed = self._attribute_mask(where) if where else None
        positions, scores = self.rank(text_enc, top_k, allowed, self.engine_filter(where))
        return SearchResult(text, self._hits(positions, scores), warnings)

    def rank(self, text_enc: object, top_k: int, allowed: np.ndarray | None = None,
             engine_filter: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(index positions, HSL scores) of the top_k products for one encoded query, best first."""
        q = self.model.query_vectors(text_enc)[0].cpu().numpy()  # [D]
        exact = self.model.exact_by_inner_product  # else: inner products only gather candidates
        positions, scores = self.index.search(q, top_k if exact else max(top_k, RERANK_CANDIDATES), allowed,
                                              **(engine_filter or {}))
        if not exact and len(positions):
            scores = self._exact_scores(text_enc, positions)
            positions, scores = best_exact(positions, scores, top_k)  # equal scores in store order
        return positions, scores

    def _exact_scores(self, text_enc: object, candidates: np.ndarray) -> np.ndarray:
        """Full HSL scores (any AGG) for a few candidate products, from their stored regions."""
        rows = self.rows[candidates]
        order = np.argsort(rows)
        with FeatureStore.open(self.store_path) as store:
            products = load_products(store, region_grid=self.model.config.region_grid, rows=rows[order])
        image = self.model.encode_image(*products.image_batch(torch.arange(len(products)), self.device))
        exact = np.empty(len(rows), dtype=np.float32)
        exact[order] = self.model.similarities(text_enc, image)["total"][0].cpu().numpy()
        return exact

    def _hits(self, positions: np.ndarray, scores: np.ndarray) -> list[Hit]:
        hits = []
        with FeatureStore.open(self.store_path) as store:
            for rank, (i, score) in enumerate(zip(positions.tolist(), scores.tolist(), strict=True), start=1):
                fields = store.row_strings(int(self.rows[i]))
                hits.append(Hit(rank=rank, id=fields["id"], score=float(score), image=fields["image"],
                                text=fields["text"], attributes=fields["attributes"]))
        return hits
