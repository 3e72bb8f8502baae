"""The ivfpq backend (hsl/ann.py): exhaustive IVF-PQ + exact re-ranking equals exact search, shards equal
one index, and bad knobs are refused with one clear line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hsl.ann import IVFPQOptions, ShardedIVFPQ, build
from hsl.config import load_config
from hsl.errors import HSLUsageError
from hsl.extract import ExtractOptions, extract
from hsl.factory import create_model, save_model
from hsl.search import Searcher
from hsl_cli.main import app
from hsl_cli.options import FLAGS

from .conftest import write_manifest


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scale")
    store = root / "shop.h5"
    extract(write_manifest(root, 40), store, ExtractOptions(backbone="tiny", workers=0))
    torch.manual_seed(0)
    model = create_model(dataclasses.replace(load_config("hsl-tiny")), 32, 24)  # index vectors: 64 dims
    save_model(model, root / "model", {"backbone": "tiny"})
    return store, root / "model"


def _ranking(searcher: Searcher, text: str, where: dict | None = None) -> tuple[list[str], list[float]]:
    hits = searcher.search(text, top_k=10, where=where).hits
    return [h.id for h in hits], [h.score for h in hits]


@pytest.mark.parametrize("shards", [1, 3])
def test_exhaustive_ivfpq_equals_exact(shop: tuple[Path, Path], shards: int) -> None:
    store, model = shop
    exact = Searcher(store, model, backend="exact")
    # every list probed and a re-rank pool past the store's size: every product is re-scored exactly
    opts = IVFPQOptions(nlist=4, m=8, dim=32, rerank=64, shards=shards)
    ivfpq = Searcher(store, model, backend="ivfpq", nprobe=4, ivfpq=opts)
    assert ivfpq.index.backend == "ivfpq" and len(ivfpq.index.ann.shards) == shards
    for text in ("red shirt", "green dress 3", "watch"):
        want_ids, want_scores = _ranking(exact, text)
        got_ids, got_scores = _ranking(ivfpq, text)
        assert got_ids == want_ids
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)
    filtered = _ranking(ivfpq, "red shirt", where={"kind": "watch"})[0]
    assert filtered == _ranking(exact, "red shirt", where={"kind": "watch"})[0] and filtered
    assert len(list(store.parent.glob(f"shop.h5.index/*.ivfpq-d32-m8-l4-s{shards}.*.faiss"))) == shards


def test_sharded_equals_unsharded_and_build_is_deterministic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 48)).astype(np.float32)
    vectors = (centres[rng.integers(0, 8, 2000)] + 0.3 * rng.standard_normal((2000, 48))).astype(np.float32)
    queries = rng.standard_normal((5, 48)).astype(np.float32)
    results = {}
    for shards in (1, 4):
        opts = IVFPQOptions(nlist=8, m=8, dim=24, shards=shards)
        paths = [tmp_path / f"s{shards}.{i}.faiss" for i in range(shards)]
        build(vectors, opts, paths, seed=3)
        index = ShardedIVFPQ(vectors, paths, nprobe=8, rerank=2000)  # exhaustive per shard
        results[shards] = [index.search(q, 10) for q in queries]
        index.close()
    for (one_ids, one_scores), (four_ids, four_scores), q in zip(results[1], results[4], queries, strict=True):
        expected = np.lexsort((np.arange(2000), -(vectors @ q)))[:10]
        assert one_ids.tolist() == four_ids.tolist() == expected.tolist()
        np.testing.assert_allclose(one_scores, four_scores)
    again = tmp_path / "again.faiss"
    build(vectors, IVFPQOptions(nlist=8, m=8, dim=24), [again], seed=3)
    assert again.read_bytes() == (tmp_path / "s1.0.faiss").read_bytes()  # seeded training: same file


@pytest.mark.parametrize(("knobs", "message"), [
    ({"m": 7}, "--pq-m 7 must divide the PCA dimension 32"),
    ({"m": 0}, "--pq-m must be a positive integer, not 0"),
    ({"nlist": 5000}, "--nlist 5000 is more than the 1000 products per shard"),
    ({"nlist": -1}, "--nlist must be a positive integer (or 0 for automatic), not -1"),
    ({"dim": 100}, "--pca-dim must be between 1 and the index dimension 64 (or 0: no PCA), not 100"),
    ({"shards": 0}, "--shards must be a positive integer, not 0"),
    ({"shards": 5000}, "--shards 5000 is more than the 1000 products"),
    ({"rerank": 0}, "--rerank must be a positive integer, not 0"),
    ({"nprobe": 0}, "--nprobe must be a positive integer, not 0"),
])
def test_bad_knobs_are_one_clear_line(knobs: dict, message: str) -> None:
    opts = IVFPQOptions(**({"dim": 32, "m": 8} | knobs))
    with pytest.raises(HSLUsageError) as caught:
        opts.resolved(1000, 64)
    error = caught.value  # the library names its own parameter; the CLI words it with its flag
    assert message in error.worded(FLAGS) and "\n" not in str(error) and "--" not in str(error)
    assert FLAGS[error.parameter] == message.split()[0] and error.value == next(iter(knobs.values()))


def test_cli_ivfpq_and_bad_knob(shop: tuple[Path, Path]) -> None:
    store, model = shop
    base = ["query", "red shirt", "--store", str(store), "--model", str(model), "--quiet", "--backend", "ivfpq"]
    ok = CliRunner().invoke(app, [*base, "--nlist", "2", "--pq-m", "4", "--pca-dim", "16", "--json", "-k", "3"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, [*base, "--pq-m", "5", "--pca-dim", "16"])
    assert bad.exit_code == 2 and "--pq-m 5 must divide the PCA dimension 16" in bad.stderr
