"""The moving average of the weights (training.average_decay, hsl/averaging.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from hsl.averaging import WeightAverage
from hsl.checkpoint import Checkpoint
from hsl.train import TrainOptions, train

from .conftest import tiny_config


def test_the_average_follows_the_weights_by_the_decay() -> None:
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, 0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update()
    assert torch.allclose(average.model.weight, start + 0.1)  # 0.9 * start + 0.1 * (start + 1)
    assert not average.model.weight.requires_grad and not average.model.training


def _config(tmp_path: Path, decay: float) -> str:
    return tiny_config(tmp_path, f"average-{decay}", average_decay=decay)


def test_the_model_folder_keeps_the_average_and_a_resume_is_exact(tiny_store: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, 0.9)
    whole = train(tiny_store, tmp_path / "whole", TrainOptions(config=config, epochs=3, seed=2, precision="fp32"))
    train(tiny_store, tmp_path / "stop", TrainOptions(config=config, epochs=1, seed=2, precision="fp32"))
    resumed = train(tiny_store, tmp_path / "stop", TrainOptions(config=config, epochs=3, seed=2, resume=True,
                                                                precision="fp32"))
    assert [h["val"] for h in resumed["history"]] == [h["val"] for h in whole["history"]]
    want, got = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "stop"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the same steps as without the average; the folder holds the average, the checkpoint the weights
    plain = train(tiny_store, tmp_path / "plain", TrainOptions(config=_config(tmp_path, 0.0), epochs=3, seed=2,
                                                               precision="fp32"))
    assert [h["loss"] for h in plain["history"]] == [h["loss"] for h in whole["history"]]
    tensors, _ = Checkpoint(tmp_path / "whole" / "checkpoint").load()
    assert all(torch.equal(tensors["model"][k], v) for k, v in load_checkpoint_model(tmp_path / "plain").items())
    assert all(not torch.equal(tensors["model"][k], tensors["average"][k]) for k in want if k.endswith("weight"))


def load_checkpoint_model(out: Path) -> dict[str, torch.Tensor]:
    return Checkpoint(out / "checkpoint").load()[0]["model"]
