"""`index_dim`: the joined vectors of several members, projected onto their principal directions.

Why: K members put K x 1,024 numbers in every index and query vector, and everything that scales
with the index (the search codes, memory, a million-product index, a Milvus collection) would grow
K times. The members encode mostly the same things: on the catalog, 1,024 of the 3,072 directions
hold 99.6% of the energy of the training products' joined vectors (docs/results.md).

The map P [joined_dim, index_dim] holds the first index_dim principal directions of the joined
vectors of the products outside the test split and of their titles' query vectors (not centred: it
is the inner product that must survive, not distances). Both sides are multiplied by P, so search
scores q P P^T v: exactly the joined score whenever v lies in those directions, and the model's
`similarities().total` is that projected score, so `hsl eval` scores what `hsl query` serves. P is
fitted once, when the members are joined, and saved with the weights (buffer `index_projection`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .dataset import Split, load_products
from .model import HSLModel
from .store import FeatureStore

_BLOCK = 512


@torch.no_grad()
def joined_vectors_of_store(model: HSLModel, store_path: str | os.PathLike, split: Split) -> dict[str, np.ndarray]:
    """{"products": [N, joined_dim] index vectors, "titles": [N, joined_dim] query vectors of their titles}
    (float64) of the store's products outside the test split, read a block at a time."""
    model.eval()
    with FeatureStore.open(store_path) as store:
        products = load_products(store, require_text=True, region_grid=model.config.region_grid, in_memory=False)
    sides = split.indices(products.ids)
    fitted = products.subset(np.sort(np.concatenate([sides["train"], sides["val"]])))
    images, titles = [], []
    for start in range(0, len(fitted), _BLOCK):
        index = torch.arange(start, min(start + _BLOCK, len(fitted)))
        image = model.encode_image(*fitted.image_batch(index, torch.device("cpu")))
        text = model.encode_text(*fitted.text_batch(index, torch.device("cpu")))
        images.append(model.joined_vectors(image).double().numpy())
        titles.append(model.joined_queries(text).double().numpy())
    return {"products": np.concatenate(images), "titles": np.concatenate(titles)}


def fit_index_projection(model: HSLModel, vectors: dict[str, np.ndarray]) -> dict:
    """Set the model's projection to the first index_dim principal directions of both sides' joined
    vectors (`joined_vectors_of_store`), each side scaled to a mean norm of 1 so that neither outweighs
    the other: directions that matter to the queries but hold little of the products' energy are kept
    too (on the catalog, fitted on the products alone R@1 fell 0.5 points; on both, not at all). What was
    fitted: products, and the share of the products' energy the kept directions hold."""
    size = model.config.index_dim
    products, titles = vectors["products"], vectors["titles"]
    # The right singular vectors of both sides stacked are the eigenvectors of their D x D second moment:
    # a few hundred MB less than the SVD of the stacked [2N, D] rows at the catalog's size.
    moment = sum(side.T @ side / max(np.linalg.norm(side, axis=1).mean(), 1e-12) ** 2 for side in (products, titles))
    values, directions = np.linalg.eigh(moment)  # ascending
    order = np.argsort(values)[::-1]
    kept = min(size, int((values > values.max() * 1e-12).sum()))  # fewer products than index_dim: zeros
    projection = np.zeros((products.shape[1], size))
    projection[:, :kept] = directions[:, order[:kept]]
    model.index_projection.copy_(torch.from_numpy(projection).float())
    energy = float(np.square(products @ projection).sum() / max(np.square(products).sum(), 1e-30))
    return {"index_dim": size, "products": len(products), "energy": round(energy, 6)}
