"""KDD Cup 2020 data: the streaming TSV reader, box extraction and resume, pool ranking with NDCG@5."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hsl.dataset import Products
from hsl.errors import HSLError, HSLUsageError, StoreMismatchError
from hsl.evaluate import evaluate
from hsl.extract import ExtractOptions, extract
from hsl.metrics import ndcg_at_5_kdd
from hsl.pools import random_ndcg_at_5
from hsl.store import DONE, PENDING, FeatureStore
from hsl.train import TrainOptions, train
from hsl_cli.main import app
from hsl_data.kdd import HEADER, KddRow, format_row, is_kdd_tsv, read_answers, read_kdd
from hsl_data.kdd_synthetic import write_synthetic_kdd
from hsl_data.sources import Rejected

from .conftest import write_folder

TINY = dict(backbone="tiny", batch_size=16)
runner = CliRunner()


def _row(product: str, query_id: str, n: int = 3, dim: int = 8, query: str = "red dress", seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    tops = rng.uniform(0, 50, (n, 2))
    boxes = np.column_stack([tops, tops + rng.uniform(1, 100, (n, 2))])  # [n,4]
    return format_row(product, 200, 300, boxes, rng.normal(size=(n, dim)), rng.integers(0, 33, n), query, query_id)


def _write(path: Path, lines: list[str], header: bool = True) -> Path:
    path.write_text("\n".join(([HEADER] if header else []) + lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def kdd(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Synthetic files, their stores (tiny text backbone) and a model trained on the train store."""
    root = tmp_path_factory.mktemp("kdd")
    files = write_synthetic_kdd(root / "data")
    extract(files.train, root / "train.h5", ExtractOptions(**TINY))
    extract(files.valid, root / "valid.h5", ExtractOptions(**TINY))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a busy 2-core machine
    try:
        train(root / "train.h5", root / "model", TrainOptions(config="hsl-tiny", epochs=4, batch_size=16, lr=3e-3,
                                                              test_fraction=0.0, val_fraction=0.1))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "files": files, "train": root / "train.h5", "valid": root / "valid.h5",
            "model": root / "model"}


def test_reader_keeps_the_largest_boxes_and_learns_the_feature_width(tmp_path: Path) -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 50, 50], [5, 5, 6, 6], [0, 0, 30, 40]], np.float32)  # area 100 2500 1 1200
    features = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
    line = format_row("p1", 100, 100, boxes, features, np.array([3, 1, 4, 1]), "blue bag", "q9")
    rows = list(read_kdd(_write(tmp_path / "a.tsv", [line]), max_boxes=2))
    assert len(rows) == 1 and isinstance(rows[0], KddRow)
    row = rows[0]
    assert (row.id, row.product_id, row.query_id, row.query, row.num_boxes) == ("q9:p1", "p1", "q9", "blue bag", 4)
    np.testing.assert_array_equal(row.boxes, boxes[[1, 3]])
    np.testing.assert_array_equal(row.features, features[[1, 3]])
    assert row.features.shape == (2, 6) and row.class_labels.tolist() == [1, 1] and row.where == "a.tsv:2"


def test_reader_without_header_and_header_detection(tmp_path: Path) -> None:
    plain = _write(tmp_path / "rows.txt", [_row("p1", "q1")], header=False)
    assert [r.id for r in read_kdd(plain)] == ["q1:p1"]
    assert not is_kdd_tsv(plain)
    assert is_kdd_tsv(_write(tmp_path / "valid.txt", [_row("p1", "q1")]))
    assert is_kdd_tsv(tmp_path / "x.tsv") is False  # no such file
    wrong = tmp_path / "b.tsv"
    wrong.write_text("product_id\tquery\n")
    with pytest.raises(HSLUsageError, match="b.tsv:1: header .* is not the KDD Cup 2020 header"):
        list(read_kdd(wrong))


def test_malformed_rows_are_reported_and_skipped(tmp_path: Path) -> None:
    good = _row("p1", "q1")
    fields = good.split("\t")

    def with_field(i: int, value: str) -> str:
        return "\t".join(fields[:i] + [value] + fields[i + 1:])

    short_features = format_row("p1", 200, 300, np.zeros((3, 4)), np.zeros((3, 8))[:, :7], np.zeros(3), "x", "q1")
    bad = {
        3: ("bad_base64", with_field(5, "!!not base64!!")),
        4: ("bad_base64", with_field(4, fields[4][:-3])),  # cut padding
        5: ("bad_row", "\t".join(fields[:8])),  # a missing column
        6: ("bad_size", short_features),  # 7 floats per box, the file's rows have 8
        7: ("num_boxes_mismatch", with_field(3, "5")),
        8: ("bad_size", with_field(6, format_row("p", 1, 1, np.zeros((2, 4)), np.zeros((2, 1)), np.zeros(2), "x",
                                                 "q").split("\t")[6])),  # 2 labels for 3 boxes
        9: ("bad_number", with_field(1, "tall")),
        10: ("empty_text", with_field(7, " ")),
        11: ("non_finite", format_row("p1", 1, 1, np.zeros((1, 4)), np.full((1, 8), np.nan), np.zeros(1), "x", "q7")),
        12: ("no_boxes", with_field(3, "0")),
    }
    path = _write(tmp_path / "bad.tsv", [good] + [line for _, line in bad.values()] + [_row("p2", "q1", seed=1)])
    rows = list(read_kdd(path))
    rejected = {int(r.where.split(":")[1]): r.reason for r in rows if isinstance(r, Rejected)}
    assert rejected == {line: reason for line, (reason, _) in bad.items()}
    assert [r.id for r in rows if isinstance(r, KddRow)] == ["q1:p1", "q1:p2"]
    detail = next(r.detail for r in rows if isinstance(r, Rejected) and r.reason == "num_boxes_mismatch")
    assert detail == "num_boxes 5, but boxes and class_labels hold 3"
    report = extract(path, tmp_path / "s.h5", ExtractOptions(**TINY))
    assert report.extracted == 2 and len(report.skipped) == len(bad)
    assert {s.where for s in report.skipped} == {f"bad.tsv:{line}" for line in bad}


def test_box_store_layout(kdd: dict) -> None:
    rows = [r for r in read_kdd(kdd["files"].valid) if isinstance(r, KddRow)]
    with h5py.File(kdd["valid"], "r") as f:
        assert f.attrs["backbone"] == "kdd2020-boxes+tiny" and int(f.attrs["num_regions"]) == 20
        assert int(f.attrs["image_dim"]) == 32 and int(f.attrs["grid"]) == 0
        assert list(f["ids"].asstr()[:3]) == [r.id for r in rows[:3]]
        assert list(f["attributes/product_id"].asstr()[:2]) == [r.product_id for r in rows[:2]]
        assert f["attributes/class_labels"].asstr()[0] == " ".join(map(str, rows[0].class_labels))
        assert f["texts"].asstr()[0] == rows[0].query and f["images"].asstr()[0] == ""
        mask, whole = f["region_mask"][:], f["image_global"][:]
        regions = f["regions"][:] * f["region_scale"][:][..., None].astype(np.float32)  # codes x scale
        assert (f["status"][:] == DONE).all()
    kept = [len(r.features) for r in rows]
    assert mask.sum(1).tolist() == kept and max(kept) == 20 and min(kept) < 20
    np.testing.assert_array_equal(regions[0][mask[0] == 0], 0)  # padding stays zero
    np.testing.assert_allclose(regions[0][: kept[0]], rows[0].features, atol=1e-2)
    np.testing.assert_allclose(whole[0], rows[0].features.mean(0), atol=1e-2)


def test_generator_follows_the_schema(kdd: dict) -> None:
    rows = [r for r in read_kdd(kdd["files"].valid, max_boxes=100) if isinstance(r, KddRow)]
    assert all(1 <= r.num_boxes <= 40 for r in rows) and min(r.num_boxes for r in rows) < 20 < max(r.num_boxes
                                                                                                  for r in rows)
    assert all(0 <= label <= 32 for r in rows for label in r.class_labels)
    pools = Counter(r.query_id for r in rows)
    assert all(28 <= n <= 32 for n in pools.values())
    answers = read_answers(kdd["files"].answers)
    assert set(answers) == set(pools) and all(2 <= len(a) <= 6 for a in answers.values())
    shared = Counter(r.product_id for r in rows)
    assert max(shared.values()) > 1  # products recur across pools
    train_rows = [r for r in read_kdd(kdd["files"].train) if isinstance(r, KddRow)]
    assert Counter(r.product_id for r in train_rows).most_common(1)[0][1] == 2  # one product, two queries


def test_rerun_resume_and_changed_rows(tmp_path: Path) -> None:
    lines = [_row(f"p{i}", f"q{i % 3}", n=1 + i % 25, seed=i) for i in range(40)]
    path = _write(tmp_path / "train.tsv", lines)
    store = tmp_path / "s.h5"

    def stop_after_first_batch(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(path, store, ExtractOptions(**TINY), progress=stop_after_first_batch)
    with FeatureStore.open(store) as opened:
        assert (opened.column("status") == DONE).sum() == 16 and (opened.column("status") == PENDING).sum() == 24
    resumed = extract(path, store, ExtractOptions(**TINY))
    assert (resumed.extracted, resumed.already_done) == (24, 16)
    clean = extract(path, tmp_path / "clean.h5", ExtractOptions(**TINY))
    assert clean.extracted == 40
    with FeatureStore.open(store) as a, FeatureStore.open(tmp_path / "clean.h5") as b:
        for name, values in a.read_features(np.arange(40)).items():
            np.testing.assert_array_equal(values, b.read_features(np.arange(40))[name], err_msg=name)
    assert extract(path, store, ExtractOptions(**TINY)).extracted == 0
    lines[5] = _row("p5", "q2", n=4, seed=99)  # same id, new features: re-extracted in place
    _write(path, lines + [_row("p40", "q0", seed=40)])  # and one new row: the file is rebuilt once
    third = extract(path, store, ExtractOptions(**TINY))
    assert (third.extracted, third.already_done) == (2, 39)
    with FeatureStore.open(store) as opened:
        assert opened.read_features(np.array([5]))["region_mask"].sum() == 4


def test_mismatched_options_are_refused(tmp_path: Path, photo_folder: Path) -> None:
    path = _write(tmp_path / "t.tsv", [_row("p1", "q1"), _row("p2", "q1", seed=1)])
    store = tmp_path / "s.h5"
    extract(path, store, ExtractOptions(**TINY, max_boxes=10))
    with pytest.raises(StoreMismatchError, match="keeps 10 boxes per image, this run asks for 20"):
        extract(path, store, ExtractOptions(**TINY, max_boxes=20))
    with pytest.raises(StoreMismatchError, match="holds backbone 'kdd2020-boxes\\+tiny'"):
        extract(path, store, ExtractOptions(backbone="minilm"))
    with pytest.raises(HSLUsageError, match="`grid` pools a photo's feature map"):
        extract(path, tmp_path / "other.h5", ExtractOptions(**TINY, grid=2))
    with pytest.raises(HSLUsageError, match="cannot encode KDD Cup queries"):
        extract(path, tmp_path / "other.h5", ExtractOptions(backbone="minilm-effnet-x"))
    photos = tmp_path / "photos.h5"
    extract(write_folder(tmp_path / "pics", 2), photos, ExtractOptions(backbone="tiny", workers=0))
    with pytest.raises(StoreMismatchError, match="holds photo features"):
        extract(path, photos, ExtractOptions(**TINY))


def test_same_product_rows_are_false_negatives() -> None:
    empty = torch.zeros(4, 1, 1)
    products = Products(ids=["a:1", "b:1", "c:2", "d:3"], texts=["red dress", "dress red", "blue hat", "Red  Dress"],
                        attributes={"product_id": ["1", "1", "2", "3"]}, images=[""] * 4, regions=empty,
                        region_mask=empty[..., 0].bool(), tokens=empty, token_mask=empty[..., 0].bool())
    keys = products.title_keys().tolist()
    assert keys[0] == keys[1] == keys[3] and keys[2] != keys[0]  # same product (0, 1), same title (0, 3)


def test_trained_model_ranks_the_planted_signal_in_each_pool(kdd: dict) -> None:
    result = evaluate(kdd["valid"], kdd["model"], answers_path=str(kdd["files"].answers))
    metrics = result["metrics"]
    assert (result["queries"], result["pools"], result["missing_pools"]) == (40, 40, 0)
    # The random baseline, by shuffling each pool: what the official NDCG@5 gives without a model.
    answers = read_answers(kdd["files"].answers)
    with FeatureStore.open(kdd["valid"]) as store:
        attrs = store.attributes()
    pools: dict[str, list[str]] = {}
    for query_id, product_id in zip(attrs["query_id"], attrs["product_id"], strict=True):
        pools.setdefault(query_id, []).append(product_id)
    rng = np.random.default_rng(0)
    shuffled = [ndcg_at_5_kdd([list(rng.permutation(pools[q])) for q in answers], [answers[q] for q in answers])
                for _ in range(200)]
    random_ndcg = float(np.mean(shuffled))
    assert abs(random_ndcg - random_ndcg_at_5(pools, answers)) < 0.01
    assert abs(metrics["random NDCG@5"] - random_ndcg) < 0.01 and random_ndcg < 0.25
    assert metrics["NDCG@5"] > random_ndcg + 0.4, metrics
    assert metrics["R@5"] > 0.9


def test_pool_eval_cli_and_errors(kdd: dict, tmp_path: Path) -> None:
    answers = kdd["files"].answers
    scored = runner.invoke(app, ["eval", "--store", str(kdd["valid"]), "--model", str(kdd["model"]),
                                 "--answers", str(answers), "--json"])
    assert scored.exit_code == 0, scored.output
    payload = json.loads(scored.stdout)
    assert payload["split"] == "pools" and payload["metrics"]["NDCG@5"] > 0.5
    partial = tmp_path / "answers.json"
    data = json.loads(answers.read_text())
    partial.write_text(json.dumps({**data, "999999": [1]}))
    result = evaluate(kdd["valid"], kdd["model"], answers_path=str(partial))
    assert result["missing_pools"] == 1 and result["queries"] == 41
    assert result["metrics"]["NDCG@5"] < payload["metrics"]["NDCG@5"]  # the missing pool scores 0
    partial.write_text("[1, 2]")
    with pytest.raises(HSLUsageError, match="answers.json: expected a JSON object"):
        evaluate(kdd["valid"], kdd["model"], answers_path=str(partial))
    partial.write_text(json.dumps({"nope": [1]}))
    with pytest.raises(HSLError, match="no query of .* has a pool"):
        evaluate(kdd["valid"], kdd["model"], answers_path=str(partial))


def test_cli_extract_tsv_and_free_text_queries(kdd: dict, tmp_path: Path) -> None:
    store = tmp_path / "v.h5"
    done = runner.invoke(app, ["extract", str(kdd["files"].valid), "--store", str(store), "--backbone", "tiny",
                               "--max-boxes", "20", "--limit", "50", "--quiet", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["extracted"] == 50
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query": "red dress", "relevant": ["1", "2"]}) + "\n")
    assert "R@10" in evaluate(kdd["valid"], kdd["model"], str(queries), split="all")["metrics"]
