"""hsl query: the fast path equals the brute-force HSL score; filters, cache, bad queries, CLI output."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hsl.backbones import create_backbone
from hsl.config import load_config
from hsl.dataset import load_products
from hsl.errors import HSLUsageError
from hsl.extract import ExtractOptions, extract
from hsl.factory import create_model, save_model
from hsl.precision import resolve_precision
from hsl.search import Searcher
from hsl.store import FeatureStore
from hsl_cli.main import app

from .conftest import synthetic_photo, write_manifest

runner = CliRunner()


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shop")
    extra = [{"id": "xss", "image": "images/xss.jpg", "text": "<script>alert(1)</script> red shirt",
              "colour": "red", "kind": "shirt"}]
    store = root / "shop.h5"
    manifest = write_manifest(root, 40, extra)
    synthetic_photo(99)[0].save(root / "images" / "xss.jpg")  # its own photo: no exact score ties
    extract(manifest, store, ExtractOptions(backbone="tiny", workers=0))
    return store


def _save_random_model(out: Path, seed: int, agg: str = "mean", granularities: tuple = ("object", "image")) -> Path:
    config = dataclasses.replace(load_config("hsl-tiny"), agg=agg, granularities=granularities, topk=2)
    torch.manual_seed(seed)
    model = create_model(config, 32, 24)
    save_model(model, out, {"backbone": "tiny"})
    return out


def _brute_force(store: Path, model_dir: Path, text: str) -> list[tuple[str, float]]:
    """The full HSL score of the query against every product of the store, no index, no shortcut; in the
    precision a Searcher picks by default, so that the two compute the same numbers."""
    from hsl.factory import load_model

    precision = resolve_precision("auto", "cpu")
    model, _ = load_model(model_dir)
    model.use_precision(precision)
    with FeatureStore.open(store) as opened:
        products = load_products(opened, region_grid=model.config.region_grid)
    features = create_backbone("tiny").use_precision(precision).encode_texts([text])
    mask = torch.arange(features.tokens.shape[1])[None] < features.lengths.clamp(min=1)[:, None]
    with torch.no_grad():
        image = model.encode_image(*products.image_batch(torch.arange(len(products)), torch.device("cpu")))
        scores = model.similarities(model.encode_text(features.tokens, mask), image).total[0]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return [(products.ids[i], float(scores[i])) for i in order]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), agg=st.sampled_from(["mean", "max", "topk"]),
       granularities=st.sampled_from([("object", "image"), ("object",), ("image",)]),
       words=st.lists(st.sampled_from(["red", "green", "blue", "shirt", "dress", "shoe", "watch", "7"]),
                      min_size=1, max_size=4))
def test_fast_path_equals_brute_force(shop: Path, tmp_path_factory: pytest.TempPathFactory, seed: int, agg: str,
                                      granularities: tuple, words: list[str]) -> None:
    model_dir = _save_random_model(tmp_path_factory.mktemp("model"), seed, agg, granularities)
    text = " ".join(words)
    hits = Searcher(shop, model_dir).search(text, top_k=10).hits
    expected = _brute_force(shop, model_dir, text)[:10]
    assert [h.id for h in hits] == [pid for pid, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], rtol=1e-4, atol=1e-5)


def test_where_filters_before_ranking(shop: Path, tmp_path: Path) -> None:
    searcher = Searcher(shop, _save_random_model(tmp_path / "m", 1))
    hits = searcher.search("red shirt", top_k=5, where={"colour": "green"}).hits
    assert hits and all(h.attributes["colour"] == "green" for h in hits)
    with pytest.raises(HSLUsageError, match="no product has it; colour has"):
        searcher.search("red shirt", where={"colour": "purple"})
    with pytest.raises(HSLUsageError, match="no such attribute column"):
        searcher.search("red shirt", where={"size": "L"})


def test_bad_queries_are_clear(shop: Path, tmp_path: Path) -> None:
    searcher = Searcher(shop, _save_random_model(tmp_path / "m", 2))
    for empty in ("", "   ", "\x00\x07\n"):
        with pytest.raises(HSLUsageError, match="`query` is empty"):
            searcher.search(empty)
    result = searcher.search("red " * 5000)
    assert result.warnings and "truncated" in result.warnings[0] and len(result.hits) == 10
    assert len(searcher.search("שמלה אדומה 👗 red\u202edress").hits) == 10


def test_index_is_cached_and_rebuilt_when_the_store_changes(tmp_path: Path) -> None:
    root = tmp_path / "shop"
    manifest = write_manifest(root, 10)
    store = root / "s.h5"
    extract(manifest, store, ExtractOptions(backbone="tiny", workers=0))
    model_dir = _save_random_model(tmp_path / "m", 3)
    calls: list[int] = []
    Searcher(store, model_dir, progress=lambda done, total: calls.append(total))
    Searcher(store, model_dir, progress=lambda done, total: calls.append(total))
    assert calls == [10]  # the second search reuses the cache
    write_manifest(root, 14)
    extract(manifest, store, ExtractOptions(backbone="tiny", workers=0))
    searcher = Searcher(store, model_dir, progress=lambda done, total: calls.append(total))
    assert calls[-1] == 14 and len(searcher.rows) == 14


def test_cli_query_json_queries_file_and_html(shop: Path, tmp_path: Path) -> None:
    model_dir = _save_random_model(tmp_path / "m", 4)
    base = ["query", "--store", str(shop), "--model", str(model_dir), "--quiet"]
    result = runner.invoke(app, [*base, "red shirt", "--top-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["query"] == "red shirt" and len(payload["results"]) == 3
    assert set(payload["results"][0]) == {"rank", "id", "score", "image", "text", "attributes"}
    queries = tmp_path / "q.txt"
    queries.write_text("red shirt\n\ngreen dress\n")
    page = tmp_path / "page.html"
    many = runner.invoke(app, [*base, "--queries", str(queries), "--json", "--html", str(page), "-k", "50"])
    lines = many.stdout.strip().splitlines()
    assert [json.loads(line)["query"] for line in lines] == ["red shirt", "green dress"]
    html = page.read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("data:image/jpeg;base64,") >= 2 * 41 - 2
    empty = runner.invoke(app, [*base, "   "])
    assert empty.exit_code == 2 and "the query is empty" in empty.stderr
    table = runner.invoke(app, [*base, "green dress", "--where", "kind=dress"])
    assert table.exit_code == 0 and "dress" in table.stdout


def test_default_model_refuses_other_backbone_store(shop: Path) -> None:
    result = runner.invoke(app, ["query", "red shirt", "--store", str(shop), "--quiet"])
    assert result.exit_code == 1
    assert "default model is for backbone 'minilm-effnet'" in result.stderr or "no default model" in result.stderr


@pytest.mark.parametrize("backend", ["flat", "ivf", "hnsw"])
def test_faiss_backends_agree_with_exact(shop: Path, tmp_path: Path, backend: str) -> None:
    model_dir = _save_random_model(tmp_path / "m", 5)
    exact = Searcher(shop, model_dir, backend="exact")
    # ivf with nprobe = every cluster and hnsw with a wide search visit everything on 41 products.
    other = Searcher(shop, model_dir, backend=backend, nprobe=64, ef_search=256)
    assert other.index.backend == backend
    for text in ("red shirt", "green dress 3", "watch"):
        want = exact.search(text, top_k=10)
        got = other.search(text, top_k=10)
        assert [h.id for h in got.hits] == [h.id for h in want.hits]
        np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in want.hits], rtol=1e-5, atol=1e-5)
    filtered = other.search("red shirt", top_k=5, where={"kind": "watch"}).hits
    assert filtered and all(h.attributes["kind"] == "watch" for h in filtered)
    assert list(shop.parent.glob(f"shop.h5.index/*.{backend}.faiss")) or backend == "exact"
