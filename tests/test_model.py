"""HSLModel, configs and the model folder, on the tiny config with random weights (seconds, no network)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hsl.config import ModelConfig, config_from_dict, config_to_dict, list_configs, load_config
from hsl.errors import HSLError, HSLUsageError
from hsl.factory import create_model, list_models, load_model, model_hash, save_model
from hsl.model import HSLModel, ImageEncoding, TextEncoding, masked_mean

IMAGE_DIM, TEXT_DIM = 12, 10


def tiny(**changes) -> ModelConfig:
    return replace(load_config("hsl-tiny"), **changes)


def make_model(config: ModelConfig | None = None, seed: int = 0) -> HSLModel:
    torch.manual_seed(seed)
    return HSLModel(config or tiny(), IMAGE_DIM, TEXT_DIM).eval()


def make_batch(seed: int, batch: int = 5, regions: int = 6, tokens: int = 7):
    """Random features with ragged masks; every row keeps at least its first position."""
    gen = torch.Generator().manual_seed(seed)
    region_mask = torch.rand(batch, regions, generator=gen) < 0.7  # [B,R]
    region_mask[:, 0] = True
    token_mask = torch.rand(batch, tokens, generator=gen) < 0.7  # [B,T]
    token_mask[:, 0] = True
    return (torch.randn(batch, regions, IMAGE_DIM, generator=gen), region_mask,
            torch.randn(batch, tokens, TEXT_DIM, generator=gen), token_mask)


def encode(model: HSLModel, seed: int = 0, **sizes) -> tuple[TextEncoding, ImageEncoding]:
    regions, region_mask, tokens, token_mask = make_batch(seed, **sizes)
    with torch.no_grad():
        return model.encode_text(tokens, token_mask), model.encode_image(regions, region_mask)


def test_shapes():
    model = make_model()
    text, image = encode(model, batch=5, regions=6)
    j = model.config.joint_dim
    assert [o.shape for o in image.objects] == [(5, 6, j)] * 2
    assert [v.shape for v in image.images] == [(5, j)] * 2
    assert [q.shape for q in text.object_queries + text.image_queries] == [(5, j)] * 4
    sims = model.similarities(text.select(torch.arange(3)), image)
    assert [s.shape for s in sims.objects + sims.images] == [(3, 5)] * 4 and sims.total.shape == (3, 5)
    assert model.index_vectors(image).shape == model.query_vectors(text).shape == (5, 4 * j)
    assert torch.allclose(image.images[0].norm(dim=-1), torch.ones(5), atol=1e-5)  # image vectors are unit


@pytest.mark.parametrize("agg", ["mean", "max", "topk"])
def test_padding_does_not_change_results(agg):
    model = make_model(tiny(agg=agg))
    regions, region_mask, tokens, token_mask = make_batch(1)
    extra = 4  # appended padded positions holding large junk values
    padded_regions = torch.cat([regions, 100 * torch.randn(5, extra, IMAGE_DIM)], dim=1)
    padded_region_mask = torch.cat([region_mask, torch.zeros(5, extra, dtype=torch.bool)], dim=1)
    padded_tokens = torch.cat([tokens, 100 * torch.randn(5, extra, TEXT_DIM)], dim=1)
    padded_token_mask = torch.cat([token_mask, torch.zeros(5, extra, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        plain = model.similarities(model.encode_text(tokens, token_mask), model.encode_image(regions, region_mask))
        image = model.encode_image(padded_regions, padded_region_mask)
        padded = model.similarities(model.encode_text(padded_tokens, padded_token_mask), image)
    for name in ("object", "image"):
        for a, b in zip(plain.levels(name), padded.levels(name), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.total, padded.total, atol=1e-5, rtol=1e-5)


def _stock_text_queries(model: HSLModel, tokens: torch.Tensor, token_mask: torch.Tensor) -> list[torch.Tensor]:
    """The object queries through the stock nn.TransformerEncoder on the padded batch."""
    attend = token_mask.clone()
    attend[:, 0] |= ~token_mask.any(dim=1)
    hidden, queries = model.text_in(tokens), []
    for level, encoder in enumerate(model.text_levels):
        hidden = encoder(hidden, src_key_padding_mask=~attend)
        queries.append(model.object_query_heads[level](masked_mean(hidden, token_mask)))
    return queries


def test_levels_are_torch_transformer_layers_on_the_valid_positions():
    """hsl/packed.py runs nn.TransformerEncoderLayer's arithmetic on the valid positions only: the same
    outputs as the stock layer on the padded batch, for texts and images."""
    model = make_model()
    regions, region_mask, tokens, token_mask = make_batch(3, batch=6, tokens=9)
    token_mask[4] = False  # a text with no valid token pools to zeros, as masked_mean gives
    with torch.no_grad():
        got, image = model.encode_text(tokens, token_mask), model.encode_image(regions, region_mask)
        expected = _stock_text_queries(model, tokens, token_mask)
        hidden = model.image_in(regions)
        for level, encoder in enumerate(model.image_levels):
            hidden = encoder(hidden, src_key_padding_mask=~region_mask)
            stock = torch.nn.functional.normalize(model.object_heads[level](hidden), dim=-1)
            torch.testing.assert_close(image.objects[level][region_mask], stock[region_mask], atol=1e-5, rtol=1e-5)
    for a, b in zip(got.object_queries, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.object_queries[0][4], model.object_query_heads[0].bias)  # head(0)


def test_packed_levels_train_with_the_stock_gradients():
    model = make_model(tiny(dropout=0.0)).train()
    _, _, tokens, token_mask = make_batch(4, batch=6, tokens=9)

    def gradients(queries: list[torch.Tensor]) -> list[torch.Tensor]:
        model.zero_grad()
        sum((q * torch.linspace(-1, 1, q.shape[-1])).sum() for q in queries).backward()
        return [p.grad.clone() for p in [model.text_in.weight, *model.text_levels.parameters()]]

    packed = gradients(model.encode_text(tokens, token_mask).object_queries)
    stock = gradients(_stock_text_queries(model, tokens, token_mask))
    for a, b in zip(packed, stock, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rows_with_nothing_valid_stay_finite():
    model = make_model()
    regions, region_mask, tokens, token_mask = make_batch(2)
    region_mask[1], token_mask[3] = False, False
    with torch.no_grad():
        sims = model.similarities(model.encode_text(tokens, token_mask), model.encode_image(regions, region_mask))
    assert torch.isfinite(sims.total).all()


def test_object_aggregation_by_hand():
    """One query, one image with 3 valid regions scoring 0.9, 0.1, 0.5 and a padded one scoring 5."""
    scores = [0.9, 0.1, 0.5, 5.0]
    objects = torch.zeros(1, 4, 4)  # [Bi,R,J]: region k is scores[k] along axis 0
    objects[0, :, 0] = torch.tensor(scores)
    mask = torch.tensor([[True, True, True, False]])
    query = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    expected = {"mean": (0.9 + 0.1 + 0.5) / 3, "max": 0.9, "topk": (0.9 + 0.5) / 2}
    for agg, value in expected.items():
        model = make_model(tiny(agg=agg, topk=2))
        assert model.object_scores(query, objects, mask).item() == pytest.approx(value)
    few_regions = torch.tensor([[True, False, False, False]])  # top-3 of a single region: that region
    assert make_model(tiny(agg="topk", topk=3)).object_scores(query, objects, few_regions).item() == pytest.approx(0.9)


@pytest.mark.parametrize("granularities", [("object", "image"), ("object",), ("image",)])
@pytest.mark.parametrize("seed", range(4))
def test_inner_product_is_the_total_score_with_mean(granularities, seed):
    model = make_model(tiny(agg="mean", granularities=granularities), seed=seed)
    assert model.exact_by_inner_product
    text, image = encode(model, seed=seed, batch=7, regions=9)
    with torch.no_grad():
        fast = model.query_vectors(text) @ model.index_vectors(image).T  # [Bt,Bi]
        torch.testing.assert_close(fast, model.similarities(text, image).total, atol=1e-5, rtol=0)


@pytest.mark.parametrize("agg", ["max", "topk"])
def test_candidates_then_rerank_with_max_and_topk(agg):
    model = make_model(tiny(agg=agg, topk=2))
    assert not model.exact_by_inner_product
    text, image = encode(model, seed=3, batch=8, regions=6)
    with torch.no_grad():
        full = model.similarities(text, image)
        coarse = model.query_vectors(text) @ model.index_vectors(image).T  # [Bt,Bi] image part only
        weights = model.config.level_weights
        torch.testing.assert_close(coarse, sum(w * s for w, s in zip(weights, full.images, strict=True)))
        candidates = coarse.topk(4, dim=1).indices  # [Bt,4]
        for row, columns in enumerate(candidates):
            reranked = model.similarities(text.select(torch.tensor([row])), image.select(columns)).total[0]
            torch.testing.assert_close(reranked, full.total[row, columns], atol=1e-6, rtol=0)


def test_granularities_remove_the_other_term():
    for granularities, present, absent in ((("image",), "image", "object"), (("object",), "object", "image")):
        model = make_model(tiny(granularities=granularities))
        sims = model.similarities(*encode(model))
        assert getattr(sims, f"{absent}s") is None
        weighted = sum(w * s for w, s in zip(model.config.level_weights, sims.levels(present), strict=True))
        torch.testing.assert_close(sims.total, weighted)
    assert not hasattr(make_model(tiny(granularities=("image",))), "object_query_heads")
    assert not hasattr(make_model(tiny(granularities=("object",))), "image_pool")


def test_gradients_reach_every_parameter():
    model = make_model().train()
    regions, region_mask, tokens, token_mask = make_batch(4)
    sims = model.similarities(model.encode_text(tokens, token_mask), model.encode_image(regions, region_mask))
    sims.total.diagonal().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_fixed_seed_is_deterministic():
    first, second = make_model(seed=7), make_model(seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                  strict=True))
    batch = make_batch(5)
    outputs = []
    for model in (first.train(), second.train()):  # dropout masks too, given the same seed
        torch.manual_seed(11)
        text, image = model.encode_text(*batch[2:]), model.encode_image(*batch[:2])
        outputs.append(model.similarities(text, image).total.detach())
    assert torch.equal(outputs[0], outputs[1])


def test_save_load_round_trip(tmp_path):
    model = make_model()
    save_model(model, tmp_path / "m", {"backbone": "tiny-test"})
    loaded, meta = load_model(tmp_path / "m")
    assert meta == {"backbone": "tiny-test", "image_dim": IMAGE_DIM, "text_dim": TEXT_DIM}
    assert loaded.config == model.config and not loaded.training
    with torch.no_grad():
        mine, theirs = model.similarities(*encode(model)), loaded.similarities(*encode(loaded))
        for a, b in zip([*mine.objects, *mine.images, mine.total], [*theirs.objects, *theirs.images, theirs.total],
                        strict=True):
            assert torch.equal(a, b)
    digest = model_hash(tmp_path / "m")
    assert len(digest) == 16 and digest == model_hash(tmp_path / "m")
    save_model(make_model(seed=1), tmp_path / "m", {"backbone": "tiny-test"})
    assert model_hash(tmp_path / "m") != digest


def test_8_bit_weights_load_back_within_their_rounding(tmp_path):
    """The shipped model's file (scripts/train_default_model.py): matrices in int8 with a scale a row,
    the rest in float16; load_model and the numpy reader give float32 weights within half a step."""
    from safetensors.numpy import load_file, save_file

    from hsl.model_files import INT8_SCALE, int8_weights, read_weights

    model = make_model(tiny(d_model=64, ff_dim=128))  # matrices of 4,096 numbers and more: 8 bits
    save_model(model, tmp_path / "m", {"backbone": "tiny-test"})
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    save_file(int8_weights(weights), str(tmp_path / "m" / "model.safetensors"))
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert stored["image_levels.0.layers.0.linear1.weight"].dtype == np.int8
    assert stored["image_levels.0.layers.0.linear1.bias"].dtype == np.float16  # vectors: float16
    read = read_weights(tmp_path / "m" / "model.safetensors")
    assert set(read) == set(weights) and all(v.dtype == np.float32 for v in read.values())
    for name, value in weights.items():
        step = stored[name + INT8_SCALE][:, None] if name + INT8_SCALE in stored else np.abs(value) / 1024 + 1e-7
        assert np.all(np.abs(read[name] - value) <= step / 2 + 1e-7), name
    loaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        mine, theirs = model.similarities(*encode(model)).total, loaded.similarities(*encode(loaded)).total
    assert torch.allclose(mine, theirs, atol=0.05) and not torch.equal(mine, theirs)


def _corrupt(folder, name, text):
    (folder / name).write_text(text)


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "config.json").unlink(), "config.json"),
    (lambda d: _corrupt(d, "config.json", "{not json"), "config.json"),
    (lambda d: _corrupt(d, "config.json", json.dumps({"name": "x", "levls": 2, "meta": {}})), "config.json"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    (lambda d: _corrupt(d, "model.safetensors", "garbage"), "model.safetensors"),
])
def test_load_errors_name_the_file(tmp_path, damage, named):
    save_model(make_model(), tmp_path, {"backbone": "tiny-test"})
    damage(tmp_path)
    with pytest.raises(HSLError, match=named):
        load_model(tmp_path)


def test_load_rejects_weights_of_another_config(tmp_path):
    save_model(make_model(), tmp_path, {})
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "joint_dim": 32}))
    with pytest.raises(HSLError, match="model.safetensors does not fit"):
        load_model(tmp_path)
    with pytest.raises(HSLError, match="not found"):
        load_model(tmp_path / "absent")


def test_shipped_configs_load_and_build():
    assert set(list_models()) == set(list_configs()) >= {
        "hsl-paper", "hsl-default", "hsl-tiny", "dual", "hsl-1level", "hsl-image-only", "hsl-object-only"}
    for name in list_configs():
        config = load_config(name)
        assert config.name == name and config_from_dict(config_to_dict(config), name) == config
    paper = load_config("hsl-paper")
    assert (paper.levels, paper.image_layers, paper.text_layers, paper.heads, paper.d_model, paper.joint_dim) == (
        2, 3, 2, 4, 512, 1024)
    assert isinstance(create_model("hsl-tiny", IMAGE_DIM, TEXT_DIM), HSLModel)


def test_benchmark_configs_load():
    """The diagnostic configs that docs/results.md reports (bench/configs) stay loadable as the schema moves."""
    paths = sorted((Path(__file__).resolve().parents[1] / "bench" / "configs").glob("*.json"))
    assert paths
    for path in paths:
        assert load_config(str(path)).name == path.stem


def test_config_errors_name_key_and_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"levels": 2, "hidden": 8}))
    with pytest.raises(HSLUsageError, match=r"mine\.json.*'hidden'"):
        load_config(path)
    path.write_text(json.dumps({"levels": 3}))  # default level_weights has two entries
    with pytest.raises(HSLUsageError, match="level_weights"):
        load_config(path)
    with pytest.raises(HSLUsageError, match="hsl-tiny"):
        load_config("no-such-config")
    with pytest.raises(HSLUsageError, match="agg"):
        tiny(agg="median")
