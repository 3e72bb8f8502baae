"""Products from a store as model inputs, and the deterministic id-based splits.

The image input of HSL is a set of regions: the whole-image vector first, then the grid cells
(docs/design.md §1: a grid of region vectors plus the whole-image vector). Tensors stay float16 in memory (the
catalog's 7.4k products take about 1 GB) and become float32 one batch at a time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import HSLError
from .masks import token_mask
from .store import DONE, FeatureStore

TEST_SALT = "hsl-test-split"  # fixed: the test split never depends on the training seed


def in_fraction(item_id: str, fraction: float, salt: str) -> bool:
    """A stable coin toss per id: the same id lands on the same side in every run and store."""
    digest = hashlib.sha256(f"{salt}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class Products:
    """Model inputs for a set of store rows: float16 tensors in memory, or (`source`, for a store
    larger than memory) read from the store one batch at a time. Both give the same numbers."""

    ids: list[str]
    texts: list[str]
    attributes: dict[str, list[str]]
    images: list[str]
    regions: torch.Tensor | None  # [N, 1+R, D] whole-image vector first, then the grid cells
    region_mask: torch.Tensor | None  # [N, 1+R] bool
    tokens: torch.Tensor | None  # [N, T, Dt]
    token_mask: torch.Tensor | None  # [N, T] bool
    source: StoreRows | None = None  # set instead of the four tensors: features stay in the store

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray | list[int]) -> Products:
        index = np.asarray(index, dtype=np.int64)
        strings = dict(ids=[self.ids[i] for i in index], texts=[self.texts[i] for i in index],
                       attributes={k: [v[i] for i in index] for k, v in self.attributes.items()},
                       images=[self.images[i] for i in index])
        if self.source is not None:
            return Products(**strings, regions=None, region_mask=None, tokens=None, token_mask=None,
                            source=self.source.subset(index))
        pick = torch.from_numpy(index)
        return Products(**strings, regions=self.regions[pick], region_mask=self.region_mask[pick],
                        tokens=self.tokens[pick], token_mask=self.token_mask[pick])

    def loaded(self) -> Products:
        """The same products with their features in memory (for a validation or test set)."""
        if self.source is None:
            return self
        regions, region_mask, tokens, token_mask = self.source.read(np.arange(len(self)))
        return Products(self.ids, self.texts, self.attributes, self.images, regions, region_mask, tokens,
                        token_mask)

    def image_batch(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is not None:
            regions, region_mask, _, _ = self.source.read(index.numpy(), text=False)
            return regions.to(device).float(), region_mask.to(device)
        return self.regions[index].to(device).float(), self.region_mask[index].to(device)

    def text_batch(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is not None:
            _, _, tokens, mask = self.source.read(index.numpy(), image=False)
        else:
            tokens, mask = self.tokens[index], self.token_mask[index]  # [B,T,Dt], [B,T]
        longest = int(mask.sum(1).max())  # titles are short: no compute on columns that are all padding
        return tokens[:, :longest].to(device).float(), mask[:, :longest].to(device)

    def title_keys(self) -> torch.Tensor:
        """[N] int: equal for products with the same normalised title (in-batch false negatives), and for
        rows with the same `product_id` attribute (a KDD Cup store has a row per (query, product) pair)."""
        seen: dict[str, int] = {}
        keys = [seen.setdefault(" ".join(t.lower().split()), len(seen)) for t in self.texts]
        if "product_id" in self.attributes:
            keys = _join_groups(keys, self.attributes["product_id"])
        return torch.tensor(keys)


def _join_groups(keys: list[int], products: list[str]) -> list[int]:
    """Merge title groups that share a product (union-find), so both kinds of duplicate get one key.

    Merging is transitive (title A - product - title B puts A's and B's rows together): a chain can
    mask a few true negatives, never keeps a false one. Exact masking would need two keys per row."""
    parent = list(range(max(keys, default=-1) + 1))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    first: dict[str, int] = {}
    for key, product in zip(keys, products, strict=True):
        parent[root(key)] = root(first.setdefault(product, key))
    return [root(k) for k in keys]


def pool_regions(regions: torch.Tensor, grid: int) -> torch.Tensor:
    """[N,g*g,D] grid cells -> [N,grid*grid,D] by adaptive average pooling (fewer, larger regions)."""
    side = int(round(regions.shape[1] ** 0.5))
    if side * side != regions.shape[1]:
        raise HSLError(f"region_grid needs a square grid of regions, the store has {regions.shape[1]}")
    out = []
    for start in range(0, len(regions), 1024):  # in blocks: float32 copies of the whole store would not fit
        block = regions[start:start + 1024].float().transpose(1, 2).unflatten(2, (side, side))  # [n,D,g,g]
        out.append(F.adaptive_avg_pool2d(block, grid).flatten(2).transpose(1, 2).half())  # [n,grid²,D]
    return torch.cat(out)


def image_inputs(features: dict[str, np.ndarray], meta: dict, region_grid: int = 0,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A block of store features -> the image input of HSL: ([n, 1+R, D] float16 whole-image vector first,
    then the grid cells pooled to `region_grid`; [n, 1+R] bool mask)."""
    whole = torch.from_numpy(features["image_global"])[:, None]  # [n,1,D]
    cells, cell_mask = torch.from_numpy(features["regions"]), torch.from_numpy(features["region_mask"]).bool()
    # Detector boxes (grid 0, KDD Cup stores) are a set, not a grid: there is nothing to pool.
    if region_grid and meta.get("grid", 1) and region_grid * region_grid != cells.shape[1]:
        cells = pool_regions(cells, region_grid)
        cell_mask = torch.ones(cells.shape[:2], dtype=torch.bool)
    regions = torch.cat([whole, cells], dim=1)  # [n,1+R,D]
    region_mask = torch.cat([torch.ones(len(whole), 1, dtype=torch.bool), cell_mask], dim=1)  # [n,1+R]
    return regions, region_mask


def token_inputs(features: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A block of store features -> ([n, T, Dt] float16 title tokens, [n, T] bool mask)."""
    lengths = torch.from_numpy(features["text_lengths"]).long()
    return torch.from_numpy(features["text_tokens"]), token_mask(lengths, features["text_tokens"].shape[1])  # [n,T]


class StoreRows:
    """Store rows whose features are read when a batch needs them (one open store per process)."""

    def __init__(self, path: Path, rows: np.ndarray, meta: dict, region_grid: int) -> None:
        self.path, self.rows, self.meta, self.region_grid = Path(path), rows, meta, region_grid
        self._store: FeatureStore | None = None

    def subset(self, index: np.ndarray) -> StoreRows:
        return StoreRows(self.path, self.rows[index], self.meta, self.region_grid)

    def read(self, index: np.ndarray, image: bool = True, text: bool = True) -> tuple:
        """(regions, region_mask, tokens, token_mask) of positions `index`, in that order (None where not asked)."""
        if self._store is None:
            self._store = FeatureStore.open(self.path)
        rows = self.rows[index]
        order = np.argsort(rows, kind="stable")
        names = (*(("image_global", "regions", "region_mask") if image else ()),
                 *(("text_tokens", "text_lengths") if text else ()))
        features = self._store.read_features(rows[order], names)
        back = torch.from_numpy(np.argsort(order))  # sorted reads, returned in the order asked
        regions = region_mask = tokens = token_mask = None
        if image:
            regions, region_mask = (t[back] for t in image_inputs(features, self.meta, self.region_grid))
        if text:
            tokens, token_mask = (t[back] for t in token_inputs(features))
        return regions, region_mask, tokens, token_mask


def load_products(store: FeatureStore, require_text: bool = False, region_grid: int = 0,
                  rows: np.ndarray | None = None, in_memory: bool = True) -> Products:
    """Every DONE row of the store (or the given sorted `rows`), regions pooled to `region_grid`; with
    `in_memory` False only the strings are read now, the features batch by batch (Products.source)."""
    if rows is None:
        keep = store.column("status") == DONE
        if require_text:
            keep &= store.column("text_lengths") > 0
        rows = np.flatnonzero(keep)
        done = int((store.column("status") == DONE).sum())
        if len(rows) == 0 and done:  # extracted, but from photos alone: nothing to learn words from
            raise HSLError(f"{store.path}: none of its {done} products has a title, and hsl train and hsl "
                           "eval pair titles with photos; extract a manifest with a title column (`text_column`) "
                           "or photos with a sibling .txt title into a store to train on")
        if len(rows) == 0:
            raise HSLError(f"{store.path}: no extracted products; run hsl extract first")
    strings = dict(ids=store.strings("ids", rows), texts=store.strings("texts", rows),
                   attributes=store.attributes(rows), images=store.strings("images", rows))
    if not in_memory:
        return Products(**strings, regions=None, region_mask=None, tokens=None, token_mask=None,
                        source=StoreRows(store.path, rows, dict(store.meta), region_grid))
    feats = store.read_features(rows)
    regions, region_mask = image_inputs(feats, store.meta, region_grid)
    tokens, token_mask = token_inputs(feats)
    return Products(**strings, regions=regions, region_mask=region_mask, tokens=tokens, token_mask=token_mask)


def feature_bytes(meta: dict, region_grid: int = 0) -> int:
    """Bytes one product's model inputs take in memory (float16): what `in_memory` would hold per row."""
    cells = region_grid * region_grid if region_grid and meta.get("grid", 1) else meta["num_regions"]
    return 2 * ((1 + cells) * meta["image_dim"] + meta["max_text_tokens"] * meta["text_dim"])


@dataclass(frozen=True)
class Split:
    test_fraction: float
    val_fraction: float
    seed: int

    def side(self, item_id: str) -> str:
        if in_fraction(item_id, self.test_fraction, TEST_SALT):
            return "test"
        return "val" if in_fraction(item_id, self.val_fraction, f"hsl-val-{self.seed}") else "train"

    def indices(self, ids: list[str]) -> dict[str, np.ndarray]:
        sides = np.array([self.side(i) for i in ids])
        return {name: np.flatnonzero(sides == name) for name in ("train", "val", "test")}
