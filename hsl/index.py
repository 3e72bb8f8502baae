"""The image side of HSL, computed once per (store, model) and cached beside the store.

With AGG = mean, HSL ranking is one maximum-inner-product search over one vector per product
(DESIGN.md §2): the cache holds those vectors. The file is rebuilt when the model or the store's
rows change, written to a temporary name and atomically renamed, so a killed `hsl index` never
leaves a half-written cache that a query would trust.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

from .dataset import load_products
from .store import DONE, FeatureStore

INDEX_VERSION = 1
_BLOCK = 512


def store_fingerprint(store: FeatureStore) -> str:
    """Changes whenever a row is added, re-extracted or finished (cheap: numeric columns only)."""
    digest = hashlib.sha256()
    for name in ("status", "file_size", "file_mtime_ns"):
        digest.update(np.ascontiguousarray(store.column(name)).tobytes())
    digest.update(str(len(store)).encode())
    return digest.hexdigest()[:16]


def index_path(store_path: str | os.PathLike, model_key: str) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".index") / f"{model_key}.h5"


def is_current(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("store_fingerprint") == fingerprint and f.attrs.get("version") == INDEX_VERSION
    except OSError:  # a damaged cache is rebuilt, never trusted
        return False


@torch.no_grad()
def build_index(store_path: str | os.PathLike, model: torch.nn.Module, model_key: str,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Encode every extracted product's image side and write the index vectors; return the file."""
    with FeatureStore.open(store_path) as store:
        fingerprint = store_fingerprint(store)
        products = load_products(store, region_grid=model.config.region_grid)
        rows = np.flatnonzero(store.column("status") == DONE)
    path = index_path(store_path, model_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    model.eval()
    device = next(model.parameters()).device
    with h5py.File(tmp, "w") as f:
        vectors = None
        for start in range(0, len(products), _BLOCK):
            index = torch.arange(start, min(start + _BLOCK, len(products)))
            block = model.index_vectors(model.encode_image(*products.image_batch(index, device))).cpu().numpy()
            if vectors is None:
                vectors = f.create_dataset("vectors", (len(products), block.shape[1]), dtype="f4")
            vectors[start:start + len(block)] = block
            if progress:
                progress(start + len(block), len(products))
        f.create_dataset("rows", data=rows.astype(np.int64))
        f.attrs.update({"version": INDEX_VERSION, "store_fingerprint": fingerprint, "model": model_key,
                        "exact": bool(model.exact_by_inner_product)})
    os.replace(tmp, path)
    return path


def load_index(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [N, D_idx] float32, store rows [N])."""
    with h5py.File(path, "r") as f:
        return f["vectors"][:], f["rows"][:]
