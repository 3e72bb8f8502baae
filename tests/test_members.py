"""Members (config `members`): independent copies of the network, trained side by side, scored as one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from hsl.config import config_to_dict
from hsl.factory import load_model, save_model
from hsl.model import HSLModel, index_dim
from hsl.train import TrainOptions, train

from .conftest import synthetic_store
from .test_model import encode, make_model, tiny


def test_the_score_is_the_sum_of_the_members_scores_and_one_inner_product() -> None:
    model = make_model(tiny(members=3))
    single = make_model(tiny())  # the same seed: the first member draws exactly a single network's weights
    assert all(torch.equal(a, b) for a, b in zip(single.state_dict().values(),
                                                  [v for k, v in model.state_dict().items()
                                                   if not k.startswith("other_members.")], strict=True))
    text, image = encode(model)
    with torch.no_grad():
        total = model.similarities(text, image).total
        members = [single, *model.other_members]
        by_member = sum(m.similarities(*encode(m)).total for m in members)
        assert torch.allclose(total, by_member, atol=1e-5)
        vectors = model.query_vectors(text) @ model.index_vectors(image).T
    assert torch.allclose(total, vectors, atol=1e-5)
    assert model.index_vectors(image).shape[1] == index_dim(model.config) == 3 * index_dim(single.config)
    assert len(text.image_queries) == len(image.objects) == 3 * single.config.levels


def test_members_round_trip_and_a_single_config_file_is_unchanged(tmp_path: Path) -> None:
    model = make_model(tiny(members=2))
    save_model(model, tmp_path / "m", {"backbone": "tiny-test"})
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.members == 2
    with torch.no_grad():
        assert torch.equal(model.similarities(*encode(model)).total, loaded.similarities(*encode(loaded)).total)
    assert "members" not in config_to_dict(tiny())  # configs of one network are written as before


def test_each_member_is_clipped_and_trained_on_its_own(tmp_path: Path) -> None:
    """Two members train end to end; their weights move apart from their (different) starts, and a
    member whose gradient is huge is clipped without shrinking the other's step."""
    store = tmp_path / "s.h5"
    synthetic_store(store, 80)
    config = json.loads((Path(__file__).parents[1] / "hsl/configs/hsl-tiny.json").read_text())
    config.update(members=2)
    config["training"]["epochs"] = 2
    path = tmp_path / "members.json"
    path.write_text(json.dumps(config))
    record = train(store, tmp_path / "model", TrainOptions(config=str(path), precision="fp32"))
    assert len(record["history"]) == 2 and all(np.isfinite(e["loss"]) for e in record["history"])
    model, _ = load_model(tmp_path / "model")
    first, second = model.member_parameters()
    assert len(first) == len(second) and not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))

    model = make_model(replace(tiny(), members=2)).train()
    regions, region_mask = torch.randn(4, 6, 12), torch.ones(4, 6, dtype=torch.bool)
    tokens, token_mask = torch.randn(4, 7, 10), torch.ones(4, 7, dtype=torch.bool)
    sims = model.similarities(model.encode_text(tokens, token_mask), model.encode_image(regions, region_mask))
    (sims.levels("image")[0].sum() * 1e6 + sims.levels("image")[-1].sum()).backward()  # member 0 huge
    for group in model.member_parameters():
        torch.nn.utils.clip_grad_norm_(group, 2.0)
    after = [torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in group if p.grad is not None]))
             for group in model.member_parameters()]
    # each clipped to 2.0 on its own; one clip over both would have shrunk the second to about 1e-5
    assert torch.allclose(torch.stack(after), torch.tensor([2.0, 2.0]), rtol=1e-3)
    assert isinstance(model.other_members[0], HSLModel)
