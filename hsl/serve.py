"""`hsl serve`: one store and one model, loaded once, answering searches from many clients at once.

`Catalog` wraps a `Searcher` for concurrent use. The Searcher creates its text encoder and its
attribute columns lazily on the first query that needs them; two threads racing there would each
build them, so `Catalog` warms both up with one filtered query before the first request. After
that a search only reads shared state (torch inference in eval mode, tokenizer encoding, h5py
reads under h5py's own lock), and the web layer (hsl/serve_api.py) runs searches in its thread
pool, so a slow search never blocks the event loop.

Product strings (id, title, photo path, attributes) are read once into memory: /products and
/images are a dict lookup, and a photo is only ever served from the path the store holds for an
id, never from a path in the request.

"More like this" is image-to-image search over the stored HSL index vectors (docs/design.md §2): the
query is the clicked product's own vector x_a = [mean O^1, v^1, ..., mean O^L, v^L], and product
b scores <x_a, x_b> = sum over levels of cos(v_a^l, v_b^l) + <mean O_a^l, mean O_b^l> (the image
vectors are unit length, the mean object vectors at most so): no level weights, no text. Its
range is [-2L, 2L] for a model that stores both granularities (L = 2 levels: [-4, 4]); a model
with one granularity, or with AGG = max | topk (image part only), stores one part per level and
scores in [-L, L]. The product itself is left out of its own list.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import HSLError, HSLUsageError
from .options import DEVICE, PRECISION, SEARCH_BACKEND, TOP_K
from .search import Hit, Searcher, SearchResult, clean_query

if TYPE_CHECKING:
    from .milvus import MilvusOptions

MAX_TOP_K = 100
MAX_FILTER_VALUES = 100  # a column with more distinct values (ids, free text) gets no dropdown


class UnknownProductError(HSLUsageError):
    """No product with this id in the served catalog, or its photo is gone (HTTP 404)."""


@dataclass
class Product:
    id: str
    text: str
    image: str  # the photo's path as the store holds it; never sent to clients
    attributes: dict[str, str]


class Catalog:
    """A Searcher plus the catalog's strings in memory, safe to call from many threads."""

    def __init__(self, store_path: str | os.PathLike, model_dir: str | os.PathLike | None = None, *,
                 device: str = DEVICE, backend: str = SEARCH_BACKEND,
                 progress: Callable[[int, int], None] | None = None, max_parallel: int | None = None,
                 precision: str = PRECISION, milvus: MilvusOptions | None = None) -> None:
        self.searcher = Searcher(store_path, model_dir, device=device, progress=progress, backend=backend,
                                 precision=precision, keep_strings=True, milvus=milvus)
        strings = self.searcher.strings  # one copy of the catalog's strings and its attribute filter
        self.columns, self.ids, self._texts, self._images = strings.columns, strings.ids, strings.texts, strings.images
        self._filter = strings.attributes
        self._values = self._filter.values  # {column: [N] value of each index position}
        self._position = {pid: i for i, pid in enumerate(self.ids) if pid}  # "": a position an update dropped
        # Searches running at once: each torch op already spreads over torch's threads, so more searches
        # than cores / threads only contend (bench/serve.py: same requests/s, higher p95). 0: no cap.
        if max_parallel is None:
            max_parallel = max(1, (os.cpu_count() or 1) // torch.get_num_threads())
        self.max_parallel = max_parallel
        self._slots = threading.BoundedSemaphore(max_parallel) if max_parallel else nullcontext()
        self.filters = _filters({c: v.tolist() for c, v in self._values.items()})
        self._warm_up()

    def __len__(self) -> int:
        return len(self.ids)

    def _warm_up(self) -> None:
        """Build the Searcher's lazy parts now, in one thread (see the module docstring)."""
        column = self.columns[0] if self.columns and len(self) else None
        value = next((v for v in self._values[column].tolist() if v), None) if column else None
        where = {column: value} if value is not None else None
        self.searcher.search("warm up", top_k=1, where=where)

    # -- lookups ----------------------------------------------------------------------------------
    def _find(self, product_id: str) -> int:
        position = self._position.get(product_id)
        if position is None:
            raise UnknownProductError(f"no product with id {product_id!r} in this catalog")
        return position

    def product(self, product_id: str) -> Product:
        i = self._find(product_id)
        return Product(self.ids[i], self._texts[i], self._images[i], self._attributes_of(i))

    def image_path(self, product_id: str) -> Path:
        """The product's photo, from the store's own path for this id (the request names an id, not a path)."""
        path = Path(self._images[self._find(product_id)])
        if not path.is_file():
            raise UnknownProductError(f"the photo of product {product_id!r} is no longer on disk")
        return path

    def _attributes_of(self, i: int) -> dict[str, str]:
        return {c: str(self._values[c][i]) for c in self.columns}

    def _allowed(self, where: dict[str, str] | None) -> np.ndarray | None:
        """[N] bool of the products matching every COLUMN=VALUE, or None for no filter."""
        return self._filter.mask(where) if where else None

    # -- searches ---------------------------------------------------------------------------------
    def search(self, query: str, top_k: int = TOP_K, where: dict[str, str] | None = None) -> SearchResult:
        """Text-to-image HSL search (the Searcher's scores)."""
        _check_top_k(top_k)
        clean_query(query)  # an empty query is refused before it waits for a slot
        self._allowed(where)  # so is an unknown column or value
        with self._slots:
            return self.searcher.search(query, top_k=top_k, where=where)

    def similar(self, product_id: str, top_k: int = TOP_K, where: dict[str, str] | None = None) -> SearchResult:
        """Products whose stored index vectors best match this product's (score: see the module docstring)."""
        _check_top_k(top_k)
        position = self._find(product_id)
        allowed = self._allowed(where)
        if allowed is not None:
            allowed[position] = False
        index = self.searcher.index
        # The stored float32 vector itself (VectorSearch keeps the h5 dataset open; one row is one small read).
        vector = np.asarray(index._vectors[position], dtype=np.float32)  # [D]
        with self._slots:
            # Unfiltered: one extra, since the product itself is (nearly always) its own best match.
            positions, scores = index.search(vector, top_k if allowed is not None else top_k + 1, allowed,
                                             **self.searcher.engine_filter(where))
        keep = positions != position
        return SearchResult(query=f"more like {product_id}", hits=self.hits(positions[keep][:top_k],
                                                                             scores[keep][:top_k]))

    def hits(self, positions: np.ndarray, scores: np.ndarray) -> list[Hit]:
        """Ranked hits for index positions, best first, from the strings in memory."""
        return self.searcher.hits(positions, scores)


def _check_top_k(top_k: int) -> None:
    if not 1 <= top_k <= MAX_TOP_K:
        raise HSLUsageError(f"`top_k` must be between 1 and {MAX_TOP_K}, got {top_k}", "top_k", top_k)


def _filters(attributes: dict[str, list[str]]) -> dict[str, list[tuple[str, int]]]:
    """{column: [(value, count), ...] by value} for the columns worth a dropdown (2..MAX_FILTER_VALUES values)."""
    out = {}
    for column, values in attributes.items():
        counts = Counter(v for v in values if v)
        if 2 <= len(counts) <= MAX_FILTER_VALUES:
            out[column] = sorted(counts.items())
    return out


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a busy port is a clear error (port 0: any free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise HSLUsageError(f"`host` {host!r}: not an address to listen on ({exc})", "host", host) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse the port at once
        sock.bind(address)
        sock.listen(2048)  # listening now: a client that connects once `ready` prints the address is not refused
    except OSError as exc:
        sock.close()
        raise HSLError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another `port` "
                       f"(`port` 0 picks a free one)", "port", port) from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
