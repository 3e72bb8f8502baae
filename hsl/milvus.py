"""Milvus as the search engine, through pymilvus: Milvus Lite embedded (a local `.db` path) or a Milvus
standalone server or distributed cluster (`http://HOST:19530`), with the same code.

One collection per (store, model): the product id is the primary key, `vector` the HSL index vector
(inner product), `digest` a content hash of (id, vector, attributes), and one VARCHAR field per attribute
column of the store, so `where` filters run inside the engine. Store rows are not kept: a store rebuilt
with products removed at the front shifts every row, and that must not re-send every product.

The collection follows the index cache (hsl/index.py). `MilvusSearch.sync` compares the digests the
collection holds with those of the current index vectors, upserts what is new or changed and deletes
what the store no longer has, in batches: what is sent and indexed is proportional to the change (the
comparison itself reads every digest and vector once). The collection is its own progress record: a
sync killed at any moment leaves batches that are either in or not, and the next sync sends only what
is still missing. Once complete, a row of the `hsl_sync_state` collection records the index fingerprint
the collection is in sync with, so a query against an unchanged store costs no comparison at all.

Search asks the engine for a pool of candidates (filtered in the engine), then re-scores them exactly
from the float32 vectors of the index file, as the faiss backends do: the ranking equals the exact one
whenever the pool holds the exact top k (always, with the exhaustive `FLAT` index).

pymilvus is imported here only, and lazily: the CLI's help and the faiss backends never load it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .ann import best_exact, read_rows
from .errors import HSLError, HSLUsageError
from .index_cache import UsedRows, cache_rows
from .options import EF_SEARCH, MILVUS_INDEX, NPROBE, RERANK_POOL

INDEX_TYPES = ("auto", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "DISKANN", "FLAT")
STATE_COLLECTION = "hsl_sync_state"
LITE_FILE = "milvus.db"  # the default Milvus Lite database, beside the index cache
# Products per upsert: at most 1,000 and ~4 MB of vectors (far inside gRPC's 64 MB message limit). Each batch
# is one unit of progress that a kill cannot undo.
_BATCH_ROWS, _BATCH_BYTES = 1000, 4 << 20
_DIGEST_BLOCK = 4096
_MAX_VARCHAR = 65535  # Milvus's bound; VARCHAR storage is by actual length
_FIXED = ("id", "vector", "digest")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_LITE_USERS: dict[str, int] = {}  # local .db path -> open MilvusSearch objects: the last one stops its server


class MilvusError(HSLError):
    """Milvus refused or failed a request (one line: the URI, what failed, what to do)."""


class MilvusUnavailableError(MilvusError):
    """No Milvus answers at the URI, or a Milvus Lite file is in use by another process."""


@dataclass(frozen=True)
class MilvusOptions:
    """Where Milvus is and which index the collection gets. `uri` None: Milvus Lite in STORE.h5.index/."""

    uri: str | None = None
    index: str = MILVUS_INDEX  # auto = HNSW (M 16, efConstruction 200); FLAT = exhaustive
    nprobe: int = NPROBE  # IVF_*: lists visited per query
    ef_search: int = EF_SEARCH  # HNSW: candidate list (at least the re-rank pool)
    connect_timeout: float = 10.0
    shards: int = 1  # a new collection's shards (write channels); a cluster's query nodes split segments anyway
    replicas: int = 1  # copies loaded on a cluster's query nodes: query throughput and failover

    def checked(self) -> MilvusOptions:
        index = self.index.upper() if self.index.lower() != "auto" else "auto"
        if index not in INDEX_TYPES:
            raise HSLUsageError(f"`milvus.index` must be one of {', '.join(INDEX_TYPES)}, not {self.index!r}",
                                "milvus.index", self.index, INDEX_TYPES)
        if self.uri is not None and not is_remote(self.uri) and not self.uri.endswith(".db"):
            raise HSLUsageError(f"`milvus.uri` {self.uri}: give http://HOST:19530 for a Milvus server, or a local "
                                "path ending in .db for Milvus Lite (e.g. catalog-milvus.db)", "milvus.uri", self.uri)
        for name, value in (("HSL_MILVUS_SHARDS", self.shards), ("HSL_MILVUS_REPLICAS", self.replicas)):
            if not isinstance(value, int) or value < 1:
                raise HSLUsageError(f"{name} must be a positive integer, not {value!r}")
        return replace(self, index=index)


@dataclass
class SyncReport:
    upserted: int = 0
    deleted: int = 0
    products: int = 0
    skipped: bool = False  # the state row said the collection already holds this index


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "unix:"))


def default_uri(index_file: Path) -> str:
    return str(index_file.parent / LITE_FILE)


def collection_name(store_path: str | os.PathLike, model_key: str) -> str:
    """hsl_<store name>_<hash of its absolute path>_<model key>: one collection per (store, model)."""
    store_path = Path(store_path).resolve()
    stem = re.sub(r"[^A-Za-z0-9_]", "_", store_path.stem)[:64]
    where = hashlib.sha256(str(store_path).encode()).hexdigest()[:8]
    return f"hsl_{stem}_{where}_{model_key}"


def field_names(columns: list[str]) -> dict[str, str]:
    """Store attribute column -> Milvus field: the column's own name where Milvus allows it, else attr_<i>.
    A column name is never pasted into an expression unchecked."""
    names = {}
    for i, column in enumerate(columns):
        ok = _FIELD_NAME.fullmatch(column) and column not in _FIXED and column not in names.values()
        names[column] = column if ok else f"attr_{i}"
    return names


def quote(value: str) -> str:
    """A Milvus string literal that holds `value` exactly: quotes, backslashes and operators inside it stay
    characters of the value and can never end the literal (Milvus Lite has no filter templates)."""
    return '"' + value.translate(_ESCAPES) + '"'


def filter_expression(where: dict[str, list[str]], fields: dict[str, str]) -> str:
    """{column: [stored values]} -> 'gender in ["Women"] and baseColour in ["Red", "red"]'."""
    clauses = []
    for column, values in where.items():
        if column not in fields:
            raise HSLUsageError(f"`where` {column}: no such attribute column; the store has {', '.join(fields)}",
                                "where", column, list(fields))
        clauses.append(f"{fields[column]} in [{', '.join(quote(v) for v in values)}]")
    return " and ".join(clauses)


def ids_expression(ids: list[str], allowed: np.ndarray) -> str:
    """An arbitrary subset of products (eval's test split, "more like this" without itself) as the shorter of
    `id in [...]` and `id not in [...]`, every id quoted."""
    keep = allowed.sum() <= len(allowed) - allowed.sum()
    chosen = np.flatnonzero(allowed if keep else ~allowed)
    if not keep and not len(chosen):
        return ""
    return f"id {'in' if keep else 'not in'} [{', '.join(quote(ids[i]) for i in chosen)}]"


class _IdLookup:
    """Product ids -> index positions, as a sorted array of UTF-8 bytes (1M ids of ~20 characters: ~20 MB,
    a tenth of a dict of str)."""

    def __init__(self, ids: list[str]) -> None:
        encoded = np.array([pid.encode() for pid in ids], dtype=bytes) if ids else np.zeros(0, "S1")
        self._order = np.argsort(encoded, kind="stable")
        self._sorted = encoded[self._order]

    def positions(self, ids: list[str]) -> np.ndarray:
        """Positions of the ids this index has, in the order given; ids it lacks are left out."""
        if not ids or not len(self._sorted):
            return np.zeros(0, np.int64)
        wanted = np.array([pid.encode() for pid in ids], dtype=bytes)
        at = np.minimum(np.searchsorted(self._sorted, wanted), len(self._sorted) - 1)
        found = self._sorted[at] == wanted
        return self._order[at[found]].astype(np.int64)


def _quiet_logs() -> None:
    """pymilvus (which configures its own loggers on import) and Milvus Lite log warnings and tracebacks on
    stderr for what this module reports in one line; MILVUS_LOG_LEVEL, pymilvus's own setting, keeps them."""
    if "MILVUS_LOG_LEVEL" in os.environ:
        return
    for name in ("pymilvus", "pymilvus.milvus_client", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _lite_in_use(path: str) -> bool:
    """Whether another process holds Milvus Lite's lock on this .db (asked only after a failed start)."""
    import fcntl

    try:
        fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def connect(uri: str, timeout: float = 10.0) -> Any:
    """A MilvusClient, or one clear line saying why there is none."""
    try:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException
    except ImportError:
        raise HSLError("the milvus backend needs pymilvus and milvus-lite: pip install 'hsl-retrieval[milvus]'") \
            from None
    _quiet_logs()
    if not is_remote(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=uri, timeout=timeout)
    except MilvusException as exc:
        raise _unavailable(uri, exc) from None


def _unavailable(uri: str, exc: Exception) -> MilvusUnavailableError:
    if not is_remote(uri):
        if _lite_in_use(uri):
            return MilvusUnavailableError(
                f"Milvus Lite database {uri} is in use by another process (Milvus Lite opens a .db in one process "
                "at a time); stop that process (an hsl serve?), or run Milvus standalone and give `milvus.uri` "
                "http://HOST:19530", "milvus.uri", uri)
        return MilvusUnavailableError(f"Milvus Lite could not open {uri} ({_message(exc)}); check the path, or "
                                      "delete the folder to start an empty database")
    return MilvusUnavailableError(
        f"cannot reach Milvus at {uri} ({_message(exc)}); start it (docker compose up -d, docs/scaling.md) or give "
        "another `milvus.uri` (HSL_MILVUS_URI)", "milvus.uri", uri)


def _message(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:300]


@contextmanager
def _calls(uri: str, what: str) -> Iterator[None]:
    """pymilvus failures as one line naming the URI and the step (a server that went away mid-way included)."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as exc:
        if getattr(exc, "code", None) == 2 or "unavailable" in _message(exc).lower():
            raise _unavailable(uri, exc) from None
        raise MilvusError(f"Milvus at {uri} failed to {what}: {_message(exc)}") from None


class MilvusSearch:
    """Maximum inner product in a Milvus collection kept in sync with the index cache; the same shape as
    VectorSearch (rows, backend, exact, search, close). Candidates are re-scored exactly from the file."""

    backend = "milvus"
    filters_in_engine = True  # Searcher passes `where` as attribute values, not only as a mask

    def __init__(self, path: Path, store_path: str | os.PathLike, model_key: str,
                 options: MilvusOptions | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.options = (options or MilvusOptions()).checked()
        self.path, self.store_path = path, Path(store_path)
        self.uri = self.options.uri or default_uri(path)
        self.collection = collection_name(store_path, model_key)
        self._index_type = ""  # what the collection has, once _ensure_collection looked
        self._attributes: dict[str, list[str]] | None = None
        self._h5 = h5py.File(path, "r")
        self.rows = cache_rows(self._h5)  # [N] store rows (-1: a position an index update dropped)
        self._vectors = UsedRows(self._h5["vectors"], len(self.rows))
        columns, self.ids = self.catalog()  # self.ids: [N] product id of each index position
        self.fields = field_names(columns)
        self._lookup = _IdLookup(self.ids)
        try:
            self._client = connect(self.uri, self.options.connect_timeout)
        except HSLError:
            self._h5.close()
            raise
        self._lite = None if is_remote(self.uri) else os.path.abspath(self.uri)
        if self._lite:
            _LITE_USERS[self._lite] = _LITE_USERS.get(self._lite, 0) + 1
        self.report = self.sync(progress)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def exact(self) -> bool:
        return self.index_type == "FLAT"

    @property
    def index_type(self) -> str:
        """The collection's vector index: the one asked for, or with "auto" the one it has (new: HNSW)."""
        return self._index_type or ("HNSW" if self.options.index == "auto" else self.options.index)

    # -- the collection -------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """What this collection must hold: the index cache (store state, model, precision), the ids and the
        attribute values (a store rebuilt with new attribute text keeps its photos' stamps and its index)."""
        attrs = {k: str(v) for k, v in self._h5.attrs.items()}
        digest = hashlib.sha256(repr((sorted(attrs.items()), sorted(self.fields.items()),
                                      self._vectors.shape)).encode())
        for values in (self.ids, *self.attributes().values()):
            digest.update("\x1f".join(values).encode() + b"\x1e")
        return digest.hexdigest()[:32]

    def _schema(self) -> Any:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=_MAX_VARCHAR)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(self._vectors.shape[1]))
        schema.add_field("digest", DataType.INT64)
        for name in self.fields.values():
            schema.add_field(name, DataType.VARCHAR, max_length=_MAX_VARCHAR)
        return schema

    def _index_params(self) -> Any:
        n = max(1, len(self.rows))
        nlist = int(max(1, min(65536, 4 * np.sqrt(n), n // 39)))  # k-means wants ~39 points per centroid
        params = {"HNSW": {"M": 16, "efConstruction": 200}, "IVF_FLAT": {"nlist": nlist},
                  "IVF_SQ8": {"nlist": nlist}, "IVF_PQ": {"nlist": nlist, "m": _pq_m(self._vectors.shape[1]),
                                                          "nbits": 8},
                  "DISKANN": {}, "FLAT": {}}[self.index_type]
        index = self._client.prepare_index_params()
        index.add_index(field_name="vector", index_type=self.index_type, metric_type="IP", params=params)
        return index

    def _fields_match(self) -> bool:
        """Same fields and vector dimension as this index needs."""
        described = self._client.describe_collection(self.collection)
        have = {f["name"]: f.get("params", {}).get("dim") for f in described["fields"]}
        want = {**dict.fromkeys(["id", "digest", *self.fields.values()]), "vector": self._vectors.shape[1]}
        return set(have) == set(want) and int(have["vector"]) == int(want["vector"])

    def _vector_index(self) -> tuple[str, str]:
        """(index name, index type) of the collection's vector field, or ("", "")."""
        names = self._client.list_indexes(self.collection, field_name="vector")
        if not names:
            return "", ""
        return names[0], str(self._client.describe_index(self.collection, names[0]).get("index_type", "")).upper()

    def _ensure_collection(self) -> None:
        """The products collection with this layout (re-created when the model's dimension or the store's
        columns changed) and the index asked for (rebuilt in place: the data stays), and the state collection."""
        client = self._client
        if client.has_collection(self.collection) and not self._fields_match():
            client.drop_collection(self.collection)
            self._set_state("")
        if not client.has_collection(self.collection):
            # Strong consistency: a search right after a sync sees its deletes (a cluster's default, Bounded,
            # may lag a moment behind; Milvus Lite is always strong).
            client.create_collection(self.collection, schema=self._schema(), index_params=self._index_params(),
                                     num_shards=self.options.shards, consistency_level="Strong")
        name, kind = self._vector_index()
        if not kind or (self.options.index != "auto" and kind != self.options.index):
            client.release_collection(self.collection)
            if name:
                client.drop_index(self.collection, name)
            client.create_index(self.collection, self._index_params())
            name, kind = self._vector_index()
        self._index_type = kind
        self._load(self.collection, self.options.replicas)
        if not client.has_collection(STATE_COLLECTION):
            from pymilvus import DataType, MilvusClient

            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("collection", DataType.VARCHAR, is_primary=True, max_length=255)
            schema.add_field("fingerprint", DataType.VARCHAR, max_length=64)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus wants one; never searched
            index = client.prepare_index_params()
            index.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
            client.create_collection(STATE_COLLECTION, schema=schema, index_params=index)
        self._load(STATE_COLLECTION, 1)

    def _load(self, name: str, replicas: int) -> None:
        """Load a collection that is not loaded; one loaded already keeps its replicas (an operator's choice)."""
        if str(self._client.get_load_state(name).get("state", "")).endswith("Loaded"):
            return
        self._client.load_collection(name, **({"replica_number": replicas} if replicas > 1 else {}))

    def _state(self) -> str:
        found = self._client.get(STATE_COLLECTION, ids=[self.collection], output_fields=["fingerprint"])
        return found[0]["fingerprint"] if found else ""

    def _set_state(self, fingerprint: str) -> None:
        if not self._client.has_collection(STATE_COLLECTION):
            return
        if fingerprint:
            self._client.upsert(STATE_COLLECTION, [{"collection": self.collection, "fingerprint": fingerprint,
                                                    "vector": [0.0, 0.0]}])
        else:
            self._client.delete(STATE_COLLECTION, ids=[self.collection])

    def stored_digests(self) -> dict[str, int]:
        """{product id: digest} of every product the collection holds."""
        found: dict[str, int] = {}
        iterator = self._client.query_iterator(self.collection, batch_size=10000, output_fields=["digest"])
        try:
            while batch := iterator.next():
                found.update((entity["id"], int(entity["digest"])) for entity in batch)
        finally:
            iterator.close()
        return found

    # -- sync ------------------------------------------------------------------------------------------
    def sync(self, progress: Callable[[int, int], None] | None = None) -> SyncReport:
        """Make the collection hold exactly the index's products; resumable after a kill (module docstring)."""
        target = self.fingerprint()
        with _calls(self.uri, f"prepare collection {self.collection}"):
            self._ensure_collection()
            if self._state() == target:
                return SyncReport(products=len(self.rows), skipped=True)
            self._set_state("")  # from here until the end the collection is "being synced"
            have = self.stored_digests()
        ids, attributes = self.ids, self.attributes()
        digests = self.digests(ids, attributes)
        # "": a position an index update dropped (hsl/index_cache.py): never sent, so deleted if it was there
        todo = np.array([i for i, pid in enumerate(ids) if pid and have.get(pid) != digests[i]], dtype=np.int64)
        gone = sorted(have.keys() - set(ids))
        batch = max(64, min(_BATCH_ROWS, _BATCH_BYTES // (4 * self._vectors.shape[1])))
        with _calls(self.uri, f"upsert into {self.collection}"):
            for start in range(0, len(todo), batch):
                self._upsert(todo[start:start + batch], ids, attributes, digests)
                if progress:
                    progress(min(start + batch, len(todo)), len(todo))
            for start in range(0, len(gone), batch):
                self._client.delete(self.collection, ids=gone[start:start + batch])
            self._client.flush(self.collection)
            self._set_state(target)
        return SyncReport(upserted=len(todo), deleted=len(gone), products=len(self.rows))

    def catalog(self) -> tuple[list[str], list[str]]:
        """(the store's attribute columns, the product id of each index position)."""
        from .store import FeatureStore

        with FeatureStore.open(self.store_path) as store:
            return list(store.meta["attribute_columns"]), store.strings("ids", self.rows)

    def attributes(self) -> dict[str, list[str]]:
        """{column: [N] value of each index position} (read once)."""
        from .store import FeatureStore

        if self._attributes is None:
            with FeatureStore.open(self.store_path) as store:
                self._attributes = store.attributes(self.rows)
        return self._attributes

    def digests(self, ids: list[str], attributes: dict[str, list[str]]) -> np.ndarray:
        """[N] int64: a hash of each product's id, float32 vector and attribute values."""
        out = np.empty(len(ids), dtype=np.int64)
        columns = list(self.fields)
        for start in range(0, len(ids), _DIGEST_BLOCK):
            block = np.ascontiguousarray(self._vectors[start:start + _DIGEST_BLOCK], dtype=np.float32)
            for j, vector in enumerate(block):
                i = start + j
                text = "\x1f".join([ids[i], *(attributes[c][i] for c in columns)])
                digest = hashlib.blake2b(vector.tobytes(), digest_size=8, key=b"hsl1")
                digest.update(text.encode())
                out[i] = int.from_bytes(digest.digest(), "little", signed=True)
        return out

    def _upsert(self, positions: np.ndarray, ids: list[str], attributes: dict[str, list[str]],
                digests: np.ndarray) -> None:
        vectors = read_rows(self._vectors, positions)
        self._client.upsert(self.collection, [
            {"id": ids[p], "vector": vectors[j], "digest": int(digests[p]),
             **{field: attributes[column][p] for column, field in self.fields.items()}}
            for j, p in enumerate(positions.tolist())])

    # -- search ----------------------------------------------------------------------------------------
    def _search_params(self, pool: int) -> dict:
        kind = self.index_type
        if kind == "HNSW":
            return {"params": {"ef": max(self.options.ef_search, pool)}}
        if kind.startswith("IVF"):
            return {"params": {"nprobe": self.options.nprobe}}
        if kind == "DISKANN":
            return {"params": {"search_list": max(100, pool)}}
        return {}

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None,
               where: dict[str, list[str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(positions into self.rows, exact inner products) of the k best, best first, as VectorSearch.search.
        `where` ({column: stored values}) runs in the engine; `allowed` [N] bool (without `where`: sent as row
        ids) is also applied to the candidates, so nothing outside it is ever returned."""
        k = min(k, len(self.rows) if allowed is None else int(allowed.sum()))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if where:
            expression = filter_expression(where, self.fields)
        elif allowed is not None:
            expression = ids_expression(self.ids, allowed)
        else:
            expression = ""
        pool = max(k, RERANK_POOL)
        with _calls(self.uri, f"search {self.collection}"):
            found = self._client.search(self.collection, data=[np.asarray(query, np.float32)], limit=pool,
                                        filter=expression, output_fields=[],
                                        search_params=self._search_params(pool))
        # An id this index does not have (a product the store no longer has) is never returned.
        positions = self._lookup.positions([hit["id"] for hit in found[0]])
        if allowed is not None:
            positions = positions[allowed[positions]]
        positions = np.unique(positions)  # ascending: h5py reads in order; ties then break by position
        exact = read_rows(self._vectors, positions) @ np.asarray(query, np.float32)
        return best_exact(positions, exact, k)

    def close(self) -> None:
        self._client.close()
        if self._lite:
            _LITE_USERS[self._lite] -= 1
            if not _LITE_USERS[self._lite]:  # the last user in this process frees the .db for others
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self._lite)
                del _LITE_USERS[self._lite]
        self._h5.close()


def _pq_m(dims: int) -> int:
    """IVF_PQ sub-quantizers: 64 bytes a product like the ivfpq backend, or the largest divisor below."""
    return next(m for m in (64, 32, 16, 8, 4, 2, 1) if dims % m == 0)
