"""hsl train and hsl eval on a tiny synthetic store: files, determinism, resume after SIGKILL, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hsl.dataset import Split
from hsl.errors import HSLUsageError, StoreMismatchError
from hsl.evaluate import evaluate
from hsl.extract import ExtractOptions, extract
from hsl.train import TrainOptions, train
from hsl_cli.main import app

from .conftest import tiny_config, write_manifest

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shop")
    manifest = write_manifest(root, 160)
    store = root / "tiny.h5"
    extract(manifest, store, ExtractOptions(backbone="tiny", workers=0, batch_size=32))
    return store


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])  # auto: bf16 on CPUs with native bf16, else fp32
def test_train_writes_model_folder_and_is_deterministic(tiny_store: Path, tmp_path: Path, precision: str) -> None:
    options = TrainOptions(config="hsl-tiny", epochs=2, seed=3, precision=precision)
    record = train(tiny_store, tmp_path / "a", options)
    for name in ("config.json", "model.safetensors", "metrics.json", "train_args.json"):
        assert (tmp_path / "a" / name).is_file(), name
    assert len(record["history"]) == 2 and record["best"]["val"]["R@10"] >= 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["meta"]["backbone"] == "tiny"
    assert record["split"]["train"] + record["split"]["val"] + record["split"]["test"] == 160
    train(tiny_store, tmp_path / "b", options)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_split_is_by_id_disjoint_and_seed_independent_for_test() -> None:
    ids = [f"p{i}" for i in range(2000)]
    one, two = Split(0.15, 0.1, 0).indices(ids), Split(0.15, 0.1, 1).indices(ids)
    assert set(one["test"].tolist()) == set(two["test"].tolist())  # the held-out test never moves
    assert set(one["val"].tolist()) != set(two["val"].tolist())
    assert not set(one["train"].tolist()) & set(one["test"].tolist())
    assert abs(len(one["test"]) / 2000 - 0.15) < 0.03


def test_out_folder_in_use_needs_resume(tiny_store: Path, tmp_path: Path) -> None:
    train(tiny_store, tmp_path / "m", TrainOptions(config="hsl-tiny", epochs=1))
    with pytest.raises(HSLUsageError, match="not empty"):
        train(tiny_store, tmp_path / "m", TrainOptions(config="hsl-tiny", epochs=1))


def test_eval_instance_and_query_files(tiny_store: Path, tmp_path: Path) -> None:
    train(tiny_store, tmp_path / "m", TrainOptions(config="hsl-tiny", epochs=2))
    result = evaluate(tiny_store, tmp_path / "m", hierarchy=["kind"])
    metrics = result["metrics"]
    assert result["split"] == "test" and result["queries"] == result["gallery"] > 0
    for key in ("R@1", "R@5", "R@10", "MRR@10", "mAP@10", "NDCG@5", "HP@5"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"]
    binary = tmp_path / "binary.jsonl"
    binary.write_text(json.dumps({"query": "red shirt", "relevant": ["p0", "p4"]}) + "\n")
    assert "R@10" in evaluate(tiny_store, tmp_path / "m", str(binary), split="all")["metrics"]
    graded = tmp_path / "graded.jsonl"
    graded.write_text(json.dumps({"query": "green dress", "attributes": {"colour": "green", "kind": "dress"}}) + "\n")
    value = evaluate(tiny_store, tmp_path / "m", str(graded), split="all")["metrics"]["gNDCG@10"]
    assert 0.0 <= value <= 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "x", "attributes": {"size": "L"}}\n')
    with pytest.raises(HSLUsageError, match="'size' is not a store column"):
        evaluate(tiny_store, tmp_path / "m", str(bad), split="all")


def test_model_refuses_store_of_other_backbone(tiny_store: Path, tmp_path: Path, photo_folder: Path) -> None:
    train(tiny_store, tmp_path / "m", TrainOptions(config="hsl-tiny", epochs=1))
    other = tmp_path / "clip.h5"
    extract(photo_folder, other, ExtractOptions(backbone="openclip:hsl-tiny-vit", workers=0))
    with pytest.raises(StoreMismatchError, match="trained on backbone 'tiny'"):
        evaluate(other, tmp_path / "m", split="all")


def test_the_configs_validation_share_and_the_flag_that_overrides_it(tiny_store: Path, tmp_path: Path) -> None:
    """training.val_fraction 0 (hsl-members3's): every non-test product trains and the last epoch is kept;
    `--val-fraction` still wins over the config, and the share in use is what train_args.json records."""
    config = tiny_config(tmp_path, "no-val", val_fraction=0.0)
    record = train(tiny_store, tmp_path / "all", TrainOptions(config=config, epochs=2, seed=1))
    assert record["split"]["val"] == 0 and record["best"]["epoch"] == 2 and record["best"]["val"] == {}
    assert record["split"]["train"] + record["split"]["test"] == 160
    assert json.loads((tmp_path / "all" / "train_args.json").read_text())["val_fraction"] == 0.0
    with pytest.raises(HSLUsageError, match="val_fraction 0.0, this run has 0.15 and 0.2; resume with the same"):
        train(tiny_store, tmp_path / "all", TrainOptions(config=config, epochs=3, seed=1, val_fraction=0.2,
                                                         resume=True))
    trained = runner.invoke(app, ["train", "--store", str(tiny_store), "--out", str(tmp_path / "flag"), "--config",
                                  config, "--epochs", "1", "--val-fraction", "0.2", "--quiet", "--json"])
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout)["split"]["val"] > 0
    assert json.loads((tmp_path / "flag" / "train_args.json").read_text())["val_fraction"] == 0.2
    plain = runner.invoke(app, ["train", "--store", str(tiny_store), "--out", str(tmp_path / "last"), "--config",
                                config, "--epochs", "1"])
    assert plain.exit_code == 0 and "no validation split: last epoch" in plain.stdout
    bad = runner.invoke(app, ["train", "--store", str(tiny_store), "--out", str(tmp_path / "bad"), "--config",
                              tiny_config(tmp_path, "bad-val", val_fraction=1.5)])
    assert bad.exit_code == 2 and "training.val_fraction must be a number in [0, 0.9]" in bad.stderr


def test_cli_train_and_eval_json(tiny_store: Path, tmp_path: Path) -> None:
    trained = runner.invoke(app, ["train", "--store", str(tiny_store), "--out", str(tmp_path / "m"),
                                  "--config", "hsl-tiny", "--epochs", "1", "--quiet", "--json"])
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout)["best_epoch"] == 1
    scored = runner.invoke(app, ["eval", "--store", str(tiny_store), "--model", str(tmp_path / "m"), "--json"])
    payload = json.loads(scored.stdout)
    assert set(payload["metrics"]) >= {"R@1", "R@10", "NDCG@5"} and payload["queries"] > 0
    missing = runner.invoke(app, ["eval", "--store", str(tiny_store), "--model", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "nope" in missing.stderr


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # the default (auto) is one of the two
def test_resume_from_every_epoch_gives_the_same_weights(tiny_store: Path, tmp_path: Path, precision: str) -> None:
    """Stopping after epoch k and resuming equals never stopping: model, Adam state and learning rate."""
    whole = train(tiny_store, tmp_path / "whole", TrainOptions(config="hsl-tiny", epochs=4, seed=5,
                                                               precision=precision))
    want = _weights(tmp_path / "whole")
    for k in (1, 3):
        out = tmp_path / f"stop{k}"
        train(tiny_store, out, TrainOptions(config="hsl-tiny", epochs=k, seed=5, precision=precision))
        resumed = train(tiny_store, out, TrainOptions(config="hsl-tiny", epochs=4, seed=5, resume=True,
                                                      precision=precision))
        got = _weights(out)
        assert all(torch.equal(got[key], want[key]) for key in want), f"resumed after epoch {k}"
        assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]


def _objective_config(tmp_path: Path, losses: dict) -> str:
    """hsl-tiny-objectives with only the given losses, as a JSON file."""
    from hsl.config import config_to_dict, load_config

    data = {**config_to_dict(load_config("hsl-tiny-objectives")), "losses": losses}
    path = tmp_path / f"tiny-{'-'.join(losses)}.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("losses", [{"hsl": 1.0, "sgml": 0.5}, {"hsl": 1.0, "huse": 0.5}])
def test_train_with_one_objective(tiny_store: Path, tmp_path: Path, losses: dict) -> None:
    from hsl.factory import load_model

    config = _objective_config(tmp_path, losses)
    record = train(tiny_store, tmp_path / "m", TrainOptions(config=config, epochs=1, seed=1))
    assert all(h["loss"] == h["loss"] for h in record["history"])  # not NaN
    heads = load_file(str(tmp_path / "m" / "objectives.safetensors"))
    name = next(n for n in losses if n != "hsl")
    assert heads and all(key.startswith(f"{name}.") for key in heads)
    model, _ = load_model(tmp_path / "m")  # search loads the model folder without the heads
    assert not any(key.startswith(name) for key in model.state_dict())
    metrics = evaluate(tiny_store, tmp_path / "m")["metrics"]
    assert ("acc_image" in metrics) == ("huse" in losses)


def test_objectives_resume_bit_exact_and_report_accuracy(tiny_store: Path, tmp_path: Path) -> None:
    """SGML and HUSE heads and their Adam state survive a stop after epoch 1 like the model does."""
    options = TrainOptions(config="hsl-tiny-objectives", epochs=3, seed=4)
    whole = train(tiny_store, tmp_path / "whole", options)
    train(tiny_store, tmp_path / "stop", TrainOptions(config="hsl-tiny-objectives", epochs=1, seed=4))
    resumed = train(tiny_store, tmp_path / "stop", TrainOptions(config="hsl-tiny-objectives", epochs=3, seed=4,
                                                                resume=True))
    for name in ("model.safetensors", "objectives.safetensors"):
        want, got = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "stop" / name))
        assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    metrics = evaluate(tiny_store, tmp_path / "whole", hierarchy=["kind"])["metrics"]
    assert 0.0 <= metrics["acc_image"] <= 1.0 and 0.0 <= metrics["acc_text"] <= 1.0 and "HP@5" in metrics


def test_objective_columns_must_be_store_columns(tiny_store: Path, tmp_path: Path) -> None:
    from hsl.config import config_to_dict, load_config

    data = config_to_dict(load_config("hsl-tiny-objectives"))
    data["huse"]["class_column"] = "articleType"
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(HSLUsageError, match="'articleType' is not a store column"):
        train(tiny_store, tmp_path / "m", TrainOptions(config=str(tmp_path / "c.json"), epochs=1))


def test_hierarchy_precision_for_attribute_queries(tiny_store: Path, tmp_path: Path) -> None:
    train(tiny_store, tmp_path / "m", TrainOptions(config="hsl-tiny", epochs=1))
    rooted = tmp_path / "rooted.jsonl"  # each query names the hierarchy's root: HP@K is defined
    rooted.write_text("".join(json.dumps({"query": q, "attributes": a}) + "\n" for q, a in [
        ("red dress", {"kind": "dress", "colour": "red"}), ("shoes", {"kind": "shoe"})]))
    metrics = evaluate(tiny_store, tmp_path / "m", str(rooted), split="all", hierarchy=["kind", "colour"])["metrics"]
    assert 0.0 <= metrics["HP@5"] <= 1.0 and "gNDCG@10" in metrics
    leaf_only = tmp_path / "leaf.jsonl"  # names the leaf but not the root: no path of its own, no HP@K
    leaf_only.write_text(json.dumps({"query": "red things", "attributes": {"colour": "red"}}) + "\n")
    assert "HP@5" not in evaluate(tiny_store, tmp_path / "m", str(leaf_only), split="all",
                                  hierarchy=["kind", "colour"])["metrics"]


def test_streamed_ranking_equals_the_full_score_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """hsl eval ranks block by block with a running top-k (memory bounded by the blocks, not the gallery):
    the same ids, in the same order, as the top 10 of the whole [Q, N] score matrix, ties by position."""
    from hsl import evaluate as ev
    from hsl.dataset import Products
    from hsl.factory import create_model
    from hsl.top_k import top_k_rows

    monkeypatch.setattr(ev, "_BLOCK", 64)
    monkeypatch.setattr(ev, "_QUERY_BLOCK", 128)  # 3 passes of queries over 5 blocks of gallery
    torch.manual_seed(0)
    model = create_model("hsl-tiny", 32, 24).eval()
    n, q = 300, 300
    regions = torch.randn(n, 17, 32).half()
    tokens = torch.randn(q, 8, 24).half()
    mask = torch.arange(8)[None] < torch.randint(1, 9, (q, 1))
    everywhere = torch.ones(n, 17, dtype=torch.bool)
    with torch.no_grad():  # the product most often first, copied to the last 5 positions: exact ties
        first = model.similarities(model.encode_text(tokens.float(), mask), model.encode_image(regions.float(),
                                                                                                  everywhere)).total
    favourite = int(torch.mode(first.argmax(dim=1)).values)
    regions[n - 5:] = regions[favourite]
    gallery = Products([f"p{i}" for i in range(n)], [""] * n, {}, [""] * n, regions, everywhere, None, None)
    got = ev.rank_top(model, gallery, ev.in_memory_queries(tokens, mask), q, torch.device("cpu"), k=10)
    with torch.no_grad():
        image = model.encode_image(regions.float(), everywhere)
        texts = [model.encode_text(tokens[s:s + 64].float(), mask[s:s + 64]) for s in range(0, q, 64)]
        scores = torch.cat([model.similarities(text, image).total for text in texts]).numpy()
    assert np.array_equal(got, top_k_rows(scores, 10))
    copies = [favourite, *range(n - 5, n)]
    tied = [[p for p in row if p in copies] for row in got.tolist() if favourite in row]
    assert tied and all(row == copies[:len(row)] for row in tied)  # the original, then its copies in store order
