"""`hsl train` under torchrun with 2 CPU processes (gloo) equals one process with the same global batch.

The config is hsl-tiny-objectives (HSL + SGML + HUSE, so every loss sees the gathered batch) with
dropout 0: with dropout, each rank draws its own masks and the runs legitimately differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hsl.config import config_to_dict, load_config
from hsl.dataset import load_products
from hsl.extract import ExtractOptions, extract
from hsl.factory import load_model
from hsl.store import FeatureStore
from hsl.train import TrainOptions, train

from .conftest import write_manifest

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "hsl_cli.main"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    store = root / "shop.h5"
    extract(write_manifest(root, 160), store, ExtractOptions(backbone="tiny", workers=0, batch_size=32))
    config = {**config_to_dict(load_config("hsl-tiny-objectives")), "name": "tiny-no-dropout", "dropout": 0.0}
    config["training"]["batch_size"] = 23  # odd: the two ranks take unequal shares (12 + 11, last 2 + 1)
    (root / "config.json").write_text(json.dumps(config))
    return store, root / "config.json"


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, env=env, timeout=300)


def _assert_same_model(store: Path, config: Path, want_dir: Path, got_dir: Path, steps: int) -> None:
    """The same scores, and weights apart by no more than Adam's rounding noise.

    The gathered batch sums in another order, so gradients differ in the last bits. Where a gradient is
    zero in exact arithmetic (key biases of attention, the bias before a softmax: shift-invariant), Adam
    divides that rounding noise by its own tiny scale and takes full steps of up to lr in either
    direction; those weights can drift apart by 2 * lr per step without changing any output. So the
    weights are held to that bound and the function itself to a tight one."""
    lr = load_config(str(config)).training["lr"]
    for name in ("model.safetensors", "objectives.safetensors"):
        want, got = load_file(str(want_dir / name)), load_file(str(got_dir / name))
        assert want.keys() == got.keys(), name
        for key in want:
            assert (got[key] - want[key]).abs().max() <= 2 * lr * steps, f"{name}: {key}"
    with FeatureStore.open(store) as handle:
        products = load_products(handle, require_text=True, region_grid=load_config(str(config)).region_grid)
    index = torch.arange(len(products))
    scores = []
    for folder in (want_dir, got_dir):
        model, _ = load_model(folder)
        with torch.no_grad():
            image = model.index_vectors(model.encode_image(*products.image_batch(index, torch.device("cpu"))))
            text = model.query_vectors(model.encode_text(*products.text_batch(index, torch.device("cpu"))))
        scores.append(text @ image.T)  # [N,N]: what search ranks by
    assert torch.allclose(scores[1], scores[0], atol=1e-4 * float(scores[0].abs().max()))


def test_two_processes_match_one_and_resume(shop: tuple[Path, Path], tmp_path: Path) -> None:
    store, config = shop
    # float32: split batches change the shapes of the products, and bf16 rounds them differently (the losses
    # then agree to about 1e-4, not 1e-5).
    single = train(store, tmp_path / "single", TrainOptions(config=str(config), epochs=2, seed=1, precision="fp32"))
    common = ["train", "--store", str(store), "--out", str(tmp_path / "ddp"), "--config", str(config), "--seed", "1",
              "--precision", "fp32"]
    first = _torchrun(*common, "--epochs", "1", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout)["best_epoch"] == 1  # one JSON document: rank 0 alone reports
    resumed = _torchrun(*common, "--epochs", "2", "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    for want, got in zip(single["history"], record["history"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)  # the same loss on the same global batches
        assert got["val"]["R@10"] == pytest.approx(want["val"]["R@10"])
    n = record["split"]["train"]
    steps = 2 * sum(1 for i in range(0, n, 23) if min(23, n - i) >= 2)  # 2 epochs of global batches of 23
    _assert_same_model(store, config, tmp_path / "single", tmp_path / "ddp", steps)
    assert json.loads((tmp_path / "ddp" / "train_args.json").read_text())["processes"] == 2


def test_rank_that_fails_stops_the_job_with_its_error(shop: tuple[Path, Path], tmp_path: Path) -> None:
    store, config = shop
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "model.safetensors").write_text("x")  # not empty and no --resume: every rank refuses
    result = _torchrun("train", "--store", str(store), "--out", str(tmp_path / "busy"), "--config", str(config))
    assert result.returncode != 0
    assert "is not empty; give another --out, or --resume" in result.stderr
