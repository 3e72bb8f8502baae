"""Pool ranking, the KDD Cup 2020 valid/test protocol: each query ranks only its own candidates.

A pool store holds one row per (query, candidate product) with the attributes `query_id` and
`product_id` (what `hsl extract` writes for a KDD Cup TSV); each row's text is its query. The
answer file maps query ids to correct product ids; the score is the official NDCG@5, averaged
over the answer file's queries as the competition's scorer does (a query without a pool scores 0).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from hsl_data.kdd import read_answers

from .dataset import Products, load_products
from .errors import HSLError
from .metrics import summarize
from .model_files import check_backbone
from .precision import resolve_precision

_POOLS_PER_BLOCK = 64  # pools scored together: one [64, ~1900] score matrix, of which each pool keeps its part


def group_pools(products: Products) -> dict[str, np.ndarray]:
    """query id -> the rows of its pool, in store order."""
    missing = [c for c in ("query_id", "product_id") if c not in products.attributes]
    if missing:
        raise HSLError(f"the store has no {missing[0]!r} attribute, so it holds no query pools; extract a KDD Cup "
                       "2020 valid/test TSV with hsl extract")
    pools: dict[str, list[int]] = {}
    for i, query_id in enumerate(products.attributes["query_id"]):
        pools.setdefault(query_id, []).append(i)
    return {query_id: np.array(rows) for query_id, rows in pools.items()}


@torch.no_grad()
def rank_pools(model: torch.nn.Module, products: Products, device: torch.device) -> dict[str, list[str]]:
    """query id -> its pool's product ids, best first (ties keep store order)."""
    model.eval()
    pools = list(group_pools(products).items())
    product_ids = products.attributes["product_id"]
    ranked: dict[str, list[str]] = {}
    for start in range(0, len(pools), _POOLS_PER_BLOCK):
        block = pools[start:start + _POOLS_PER_BLOCK]
        rows = torch.from_numpy(np.concatenate([r for _, r in block]))  # [M] every row of the block's pools
        heads = torch.tensor([int(r[0]) for _, r in block])  # [P] each pool's query: its first row's text
        image = model.encode_image(*products.image_batch(rows, device))
        text = model.encode_text(*products.text_batch(heads, device))
        scores = model.similarities(text, image).total.cpu()  # [P,M]
        offset = 0
        for j, (query_id, pool) in enumerate(block):
            own = scores[j, offset:offset + len(pool)]  # [n] this query against its own candidates only
            order = torch.argsort(own, descending=True, stable=True).tolist()
            ranked[query_id] = [product_ids[pool[o]] for o in order]
            offset += len(pool)
    return ranked


def random_ndcg_at_5(ranked: dict[str, list[str]], answers: dict[str, set[str]]) -> float:
    """Expected official NDCG@5 of a random order of each pool: every place holds a correct product
    with probability (correct in pool) / (pool size). What a model must clearly beat."""
    discount = 1.0 / np.log2(np.arange(2, 7))  # [5] 1, 1/log2(3), ... as in the official dcg
    total = 0.0
    for query_id, truth in answers.items():
        pool = ranked.get(query_id, [])
        if pool and truth:
            hit_rate = len(truth & set(pool)) / len(pool)
            total += hit_rate * discount[:min(5, len(pool))].sum() / discount[:min(5, len(truth))].sum()
    return total / len(answers)


def evaluate_pools(store_path: str | os.PathLike, model_dir: str | os.PathLike, answers_path: str | os.PathLike,
                   device: str = "cpu", precision: str = "auto") -> dict:
    """Metrics of a model on a pool store: the official NDCG@5, R@K, MRR, mAP within each pool."""
    from .factory import load_model
    from .store import FeatureStore

    answers = read_answers(answers_path)  # before the model: a wrong file fails fast
    model, meta = load_model(model_dir)
    torch_device = torch.device(device)
    resolved = resolve_precision(precision, torch_device)
    model.to(torch_device).use_precision(resolved)
    with FeatureStore.open(store_path) as store:
        check_backbone(store, meta, str(model_dir))
        # Features are read a block of pools at a time (Products.source): memory does not grow with the store.
        products = load_products(store, require_text=True, region_grid=model.config.region_grid, in_memory=False)
    ranked = rank_pools(model, products, torch_device)
    missing = [q for q in answers if q not in ranked]
    if len(missing) == len(answers):
        raise HSLError(f"no query of {answers_path} has a pool in {store_path} (e.g. query id {missing[0]!r}); "
                       "give the answer file of this split")
    rankings = [ranked.get(q, []) for q in answers]  # a query without a pool ranks nothing: scores 0
    metrics = summarize(rankings, [answers[q] for q in answers])
    metrics["random NDCG@5"] = random_ndcg_at_5(ranked, answers)
    return {"metrics": {key: round(float(v), 6) for key, v in metrics.items()}, "queries": len(answers),
            "gallery": len(products), "split": "pools", "pools": len(ranked), "missing_pools": len(missing),
            "unanswered_pools": sum(q not in answers for q in ranked), "precision": resolved.name}
