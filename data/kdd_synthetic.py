"""Synthetic KDD Cup 2020 files with a planted signal: the real data cannot be downloaded here.

The layout follows the competition exactly (data/kdd.py): a train TSV of (query, product) pairs, a
valid TSV of query pools (about 30 candidates, 2-6 of them correct) and valid_answer.json. Each
product has a colour and a kind; its larger boxes carry the sum of the two words' directions in
feature space, its smaller (background) boxes a random other word, all with noise, so the query
words map to a direction in box-feature space and a model that learns it ranks the right products first.
Products appear in several pools, and some train products with two different queries.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .kdd import HEADER, format_row

COLOURS = ("red", "blue", "green", "black", "white", "pink")
KINDS = ("dress", "shoe", "bag", "shirt", "watch", "hat")
FILLERS = ("new", "women", "summer", "fashion", "2020")
NUM_CLASSES = 33  # class ids 0-32, as in the released data


@dataclass(frozen=True)
class SyntheticKdd:
    train: Path
    valid: Path
    answers: Path


@dataclass(frozen=True)
class _Product:
    id: str
    colour: int
    kind: int
    line: tuple  # format_row's arguments after product_id, without the query columns


def _product(rng: np.random.Generator, pid: int, colour: int, kind: int, words: np.ndarray, dim: int) -> _Product:
    n = int(rng.integers(1, 41))  # 1-40 boxes, as in the released data
    h, w = int(rng.integers(300, 801)), int(rng.integers(300, 801))
    sides = np.column_stack([rng.uniform(0.05, 0.45, n) * h, rng.uniform(0.05, 0.45, n) * w])  # [n,2] small
    sides[0] = (0.9 * h, 0.9 * w)  # the product itself: the largest box, kept by any top-k
    sides = sides[np.argsort(-sides.prod(axis=1), kind="stable")]  # largest first, to plant the words by size
    tops = rng.uniform(0, 1, (n, 2)) * (np.array([h, w]) - sides)  # [n,2]
    boxes = np.column_stack([tops, tops + sides]).astype(np.float32)  # [n,4] top, left, bottom, right
    features = rng.normal(0, 0.5, (n, dim)).astype(np.float32)  # [n,D]
    parts = n - n // 3  # the largest two thirds of the boxes show the product: they carry its two words
    features[:parts] += words[colour] + words[len(COLOURS) + kind]
    features[parts:] += words[rng.integers(0, len(words), n - parts)]  # small background boxes: other words
    labels = rng.integers(0, NUM_CLASSES, n)
    labels[0] = kind
    order = rng.permutation(n)  # the file's order is not by area: the reader must sort
    return _Product(str(pid), colour, kind, (h, w, boxes[order], features[order], labels[order]))


def _catalog(rng: np.random.Generator, first_id: int, per_combo: int, words: np.ndarray, dim: int) -> list[_Product]:
    products = []
    for colour in range(len(COLOURS)):
        for kind in range(len(KINDS)):
            for _ in range(per_combo):
                products.append(_product(rng, first_id + len(products) * 7, colour, kind, words, dim))
    return products


def _query(rng: np.random.Generator, colour: int, kind: int) -> str:
    words = [COLOURS[colour], KINDS[kind]]
    if rng.random() < 0.5:
        words.insert(int(rng.integers(0, 3)), FILLERS[int(rng.integers(0, len(FILLERS)))])
    return " ".join(words)


def write_synthetic_kdd(root: str | os.PathLike, feature_dim: int = 32, train_per_combo: int = 12,
                        valid_queries: int = 40, seed: int = 0) -> SyntheticKdd:
    """train.tsv, valid.tsv and valid_answer.json under `root`; the same seed gives the same bytes."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = rng.normal(0, 1, (len(COLOURS) + len(KINDS), feature_dim))
    words *= 1.5 / np.linalg.norm(words, axis=1, keepdims=True)  # [W,D] one direction per query word
    query_ids: dict[str, str] = {}

    def query_id(text: str) -> str:
        return query_ids.setdefault(text, str(1000 + 3 * len(query_ids)))

    train_lines = [HEADER]
    for product in _catalog(rng, 100_000, train_per_combo, words, feature_dim):
        texts = {_query(rng, product.colour, product.kind)}
        while rng.random() < 0.3 and len(texts) < 2:  # about 30% of products come with a second query
            texts.add(_query(rng, product.colour, product.kind))
        for text in sorted(texts):
            train_lines.append(format_row(product.id, *product.line, text, query_id(text)))
    # The valid catalog is new products; each pool draws from all of it, so products recur across pools.
    catalog = _catalog(rng, 500_000, 8, words, feature_dim)
    valid_lines, answers = [HEADER], {}
    for q in range(valid_queries):
        colour, kind = int(rng.integers(0, len(COLOURS))), int(rng.integers(0, len(KINDS)))
        same = [p for p in catalog if (p.colour, p.kind) == (colour, kind)]
        near = [p for p in catalog if (p.colour == colour) != (p.kind == kind)]  # one word right: hard negatives
        far = [p for p in catalog if p.colour != colour and p.kind != kind]
        positives = rng.choice(len(same), int(rng.integers(2, 7)), replace=False)
        size = int(rng.integers(28, 33))
        hard = rng.choice(len(near), (size - len(positives)) // 2, replace=False)
        easy = rng.choice(len(far), size - len(positives) - len(hard), replace=False)
        pool = [same[i] for i in positives] + [near[i] for i in hard] + [far[i] for i in easy]
        qid, text = str(10 * q + 7), _query(rng, colour, kind)
        answers[qid] = [int(same[i].id) for i in positives]  # ints, as in the released answer file
        for i in rng.permutation(len(pool)):
            valid_lines.append(format_row(pool[i].id, *pool[i].line, text, qid))
    paths = SyntheticKdd(root / "train.tsv", root / "valid.tsv", root / "valid_answer.json")
    paths.train.write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    paths.valid.write_text("\n".join(valid_lines) + "\n", encoding="utf-8")
    paths.answers.write_text(json.dumps(answers), encoding="utf-8")
    return paths
