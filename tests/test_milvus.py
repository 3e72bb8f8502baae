"""`--backend milvus` against Milvus Lite: exact equality with an exhaustive index, the collection following the
store, a killed `hsl index`, a Milvus that is down or busy, filter values that try to inject, and the commands."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pymilvus", reason="pymilvus is not installed: pip install 'hsl-retrieval[milvus]'")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed: pip install 'hsl-retrieval[milvus]'")

from typer.testing import CliRunner  # noqa: E402

from hsl.backbones import create_backbone  # noqa: E402
from hsl.factory import create_model, save_model  # noqa: E402
from hsl.milvus import MilvusOptions, MilvusSearch, filter_expression, quote  # noqa: E402
from hsl.search import Searcher  # noqa: E402
from hsl.store import DONE, FeatureStore, RowPlan  # noqa: E402
from hsl_cli.main import app  # noqa: E402

HSL = [sys.executable, "-m", "hsl_cli.main"]
FLAT = MilvusOptions(index="FLAT")  # exhaustive: the engine's pool holds the exact top k
QUERIES = ["red shirt", "green dress 3", "blue shoe", "black watch 12", "product"]
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def milvus_lite_starts(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip the module, with the reason, where Milvus Lite cannot start here."""
    from pymilvus import MilvusClient

    path = tmp_path_factory.mktemp("probe") / "probe.db"
    try:
        MilvusClient(str(path)).close()
    except Exception as exc:  # noqa: BLE001 - whatever stops it, the reason is the skip message
        pytest.skip(f"Milvus Lite does not start here: {type(exc).__name__}: {exc}")
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "m"
    save_model(create_model("hsl-tiny", 32, 24), out, {"backbone": "tiny"})
    return out


def _ids(result: object) -> list[str]:
    return [hit.id for hit in result.hits]


def _searcher(store: Path, model: Path, options: MilvusOptions | None = None) -> Searcher:
    return Searcher(store, model, backend="milvus", milvus=options or FLAT)


def test_flat_index_ranks_exactly_like_the_exact_backend(tiny_store: Path, model_dir: Path) -> None:
    exact = Searcher(tiny_store, model_dir, backend="exact")
    milvus = _searcher(tiny_store, model_dir)
    try:
        assert milvus.index.report.upserted == len(exact.rows)
        for text in QUERIES:
            for where in (None, {"colour": "RED"}, {"colour": "green", "kind": "dress"}):
                want, got = exact.search(text, 10, where), milvus.search(text, 10, where)
                assert _ids(got) == _ids(want) and _ids(got)
                np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in want.hits], rtol=1e-5,
                                           atol=1e-6)
        allowed = np.zeros(len(milvus.rows), bool)  # a few products by id (eval's test split): `id in [...]`
        allowed[[3, 10, 11, 50]] = True
        vector = np.asarray(milvus.index._vectors[0], np.float32)
        assert sorted(milvus.index.search(vector, 10, allowed)[0].tolist()) == [3, 10, 11, 50]
    finally:
        milvus.close()


def _write_store(path: Path, products: dict[str, int], kinds: list[str] | None = None) -> None:
    """A tiny-backbone store of {id: version}; a product's features and file stamp follow its id and version, so
    an unchanged product keeps its vector and a new version changes it (as a re-extracted photo would)."""
    meta = {**create_backbone("tiny").describe(), "hsl_version": "test"}
    kinds = kinds or [f"k{int(pid[1:]) % 5}" for pid in products]
    rows = [RowPlan(pid, f"/nowhere/{pid}.jpg", f"product {pid}", {"kind": kind}, 1, version)
            for (pid, version), kind in zip(products.items(), kinds, strict=True)]
    path.unlink(missing_ok=True)
    FeatureStore.build(path, meta, rows, ["kind"])
    features: dict[str, list] = {}
    for pid, version in products.items():
        rng = np.random.default_rng(int(hashlib.sha256(f"{pid}/{version}".encode()).hexdigest()[:8], 16))
        for name, shape in (("image_global", (32,)), ("regions", (16, 32)), ("text_tokens", (16, 24))):
            features.setdefault(name, []).append(rng.standard_normal(shape).astype(np.float16))
    n = len(products)
    with FeatureStore.open(path, writable=True) as store:
        store.write_features(np.arange(n), {**{k: np.stack(v) for k, v in features.items()},
                                            "region_mask": np.ones((n, 16), np.uint8),
                                            "text_lengths": np.full(n, 3, np.int32),
                                            "text_sentence": np.zeros((n, 24), np.float16)})
        store.set_column("status", np.arange(n), DONE)


def _collection(index: MilvusSearch) -> dict[str, np.ndarray]:
    """{id: vector} of everything the collection holds."""
    found = {}
    iterator = index._client.query_iterator(index.collection, batch_size=1000, output_fields=["vector"])
    while batch := iterator.next():
        found.update((e["id"], np.asarray(e["vector"], np.float32)) for e in batch)
    iterator.close()
    return found


def _assert_collection_equals_index(index: MilvusSearch, store: Path) -> None:
    with FeatureStore.open(store) as opened:
        ids = opened.strings("ids", index.rows)
    held = _collection(index)
    assert sorted(held) == sorted(ids)
    vectors = index._vectors[:]
    for position, pid in enumerate(ids):
        np.testing.assert_array_equal(held[pid], vectors[position])
    assert index.stored_digests() == dict(zip(ids, index.digests(ids, index.attributes()).tolist(), strict=True))


def test_the_collection_follows_the_store(tmp_path: Path, model_dir: Path) -> None:
    store = tmp_path / "shop.h5"
    first = {f"p{i}": 1 for i in range(300)}
    _write_store(store, first)
    searcher = _searcher(store, model_dir)
    assert (searcher.index.report.upserted, searcher.index.report.deleted) == (300, 0)
    searcher.close()

    second = {pid: v for pid, v in first.items() if int(pid[1:]) >= 50}  # 50 removed
    second.update({f"p{i}": 2 for i in range(50, 60)})  # 10 changed (new vectors)
    second.update({f"p{i}": 1 for i in range(300, 340)})  # 40 new
    _write_store(store, second)
    started = time.perf_counter()
    searcher = _searcher(store, model_dir)
    try:
        report = searcher.index.report
        assert (report.upserted, report.deleted, report.skipped) == (50, 50, False)
        _assert_collection_equals_index(searcher.index, store)
        for text in QUERIES:  # every product could be returned: nothing the store lost ever is
            assert not {pid for pid in _ids(searcher.search(text, 100)) if pid not in second}
    finally:
        searcher.close()
    assert time.perf_counter() - started < 60
    again = _searcher(store, model_dir)  # unchanged store: the state row says so, nothing is compared or sent
    assert again.index.report.skipped and again.index.report.upserted == 0
    again.close()

    # New attribute text, same photos: the store's stamps and the index cache stay, the collection follows.
    kinds = ["new kind" if i < 5 else f"k{int(pid[1:]) % 5}" for i, pid in enumerate(second)]
    _write_store(store, second, kinds)
    relabelled = _searcher(store, model_dir)
    try:
        assert (relabelled.index.report.upserted, relabelled.index.report.deleted) == (5, 0)
        assert sorted(_ids(relabelled.search("product", 10, {"kind": "New Kind"}))) == sorted(list(second)[:5])
    finally:
        relabelled.close()


def _wal_written(db: Path) -> bool:
    """Whether Milvus Lite has logged any product upsert yet (its write-ahead log, on disk before the reply)."""
    return any(f.is_file() and f.stat().st_size > 0 for f in db.glob("collections/hsl_big_*/wal/*"))


def test_a_killed_hsl_index_leaves_a_collection_the_rerun_completes(tmp_path: Path, model_dir: Path) -> None:
    store, db = tmp_path / "big.h5", tmp_path / "lite.db"
    _write_store(store, {f"p{i}": 1 for i in range(12000)})
    Searcher(store, model_dir)  # the index cache first: the run below spends its time upserting
    command = [*HSL, "index", "--store", str(store), "--model", str(model_dir), "--backend", "milvus",
               "--milvus-uri", str(db), "--quiet", "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not _wal_written(db) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"hsl index ended before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)  # mid-upsert, as the OOM killer or kill -9 would
    proc.wait(timeout=60)

    from pymilvus import MilvusClient

    client = MilvusClient(str(db))  # what the kill left, looked at without syncing it
    collection = next(name for name in client.list_collections() if name.startswith("hsl_big_"))
    left = client.get_collection_stats(collection)["row_count"]
    synced = []
    if client.has_collection("hsl_sync_state"):
        client.load_collection("hsl_sync_state")
        synced = client.get("hsl_sync_state", ids=[collection])
    assert left < 12000 and not synced, (left, synced)  # killed mid-way: part of the products, no state row
    client.close()
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(db))  # the rerun is another process: free the .db for it

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)["milvus"]
    assert report["upserted"] == 12000 - left and report["deleted"] == 0  # only what the kill left out
    index = Searcher(store, model_dir, backend="milvus", milvus=MilvusOptions(uri=str(db))).index
    try:
        assert index.report.skipped  # the rerun finished: in sync with this index
        _assert_collection_equals_index(index, store)
    finally:
        index.close()


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_milvus_that_is_down_or_busy_is_one_clear_line(tiny_store: Path, model_dir: Path, tmp_path: Path) -> None:
    query = [*HSL, "query", "red shirt", "--store", str(tiny_store), "--model", str(model_dir), "--quiet",
             "--backend", "milvus"]
    down = subprocess.run([*query, "--milvus-uri", "http://127.0.0.1:1"], capture_output=True, text=True)
    assert "cannot reach Milvus at http://127.0.0.1:1" in _one_error_line(down)

    db = tmp_path / "busy.db"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pymilvus import MilvusClient\n"
                               f"MilvusClient({str(db)!r}); print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        busy = subprocess.run([*query, "--milvus-uri", str(db)], capture_output=True, text=True)
        assert "is in use by another process" in _one_error_line(busy)
    finally:
        holder.kill()
        holder.wait()


TRICKY = ['red" or kind != "x', "red' || true", 'a\\" or 1 == 1 or kind == "', "x in [1] and", "\\", 'semi";--']


def test_filter_values_cannot_change_the_expression(tmp_path: Path, model_dir: Path) -> None:
    for value in TRICKY:  # the literal reads back as exactly the value (Milvus Lite's own tokenizer)
        from milvus_lite.search.filter.tokens import tokenize

        tokens = tokenize(f"kind == {quote(value)}")
        assert [t.value for t in tokens if t.kind.name == "STRING"] == [value]
    assert filter_expression({"kind": TRICKY[:1]}, {"kind": "kind"}) == 'kind in ["red\\" or kind != \\"x"]'

    store = tmp_path / "odd.h5"
    kinds = [TRICKY[i // 2 % len(TRICKY)] if i % 2 else "red" for i in range(120)]  # each tricky value, and "red"
    _write_store(store, {f"p{i}": 1 for i in range(120)}, kinds)
    exact, milvus = Searcher(store, model_dir, backend="exact"), _searcher(store, model_dir)
    try:
        for value in TRICKY:
            got = milvus.search("product", 100, {"kind": value})
            assert {h.attributes["kind"] for h in got.hits} == {value}  # exactly the value, not "red" too
            assert _ids(got) == _ids(exact.search("product", 100, {"kind": value}))
    finally:
        milvus.close()


def test_query_serve_and_eval_work_with_the_option(tiny_store: Path, model_dir: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "cli.db")
    common = ["--store", str(tiny_store), "--model", str(model_dir)]

    def query(*options: str) -> list[str]:
        result = runner.invoke(app, ["query", "red shirt", *common, "--json", "--quiet", "--where", "colour=red",
                                     *options])
        assert result.exit_code == 0, result.output
        return [hit["id"] for hit in json.loads(result.stdout)["results"]]

    assert query("--backend", "milvus", "--milvus-uri", db, "--milvus-index", "FLAT") == query("--backend", "exact")

    lines = [{"query": f"{colour} {kind}", "attributes": {"colour": colour, "kind": kind}}
             for colour in ("red", "green", "blue") for kind in ("shirt", "dress", "shoe")]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    evaluate = ["eval", *common, "--split", "all", "--json", "--queries", str(tmp_path / "q.jsonl")]
    want = runner.invoke(app, [*evaluate, "--backend", "flat"])
    env_milvus = {"HSL_BACKEND": "milvus", "HSL_MILVUS_URI": db, "HSL_MILVUS_INDEX": "FLAT"}  # the env equivalent
    got = runner.invoke(app, evaluate, env=env_milvus)
    assert got.exit_code == 0 and want.exit_code == 0, got.output + want.output
    assert json.loads(got.stdout)["metrics"] == json.loads(want.stdout)["metrics"]

    from hsl.serve import Catalog

    served = Catalog(tiny_store, model_dir, backend="milvus", milvus=MilvusOptions(uri=db, index="FLAT"))
    plain = Catalog(tiny_store, model_dir, backend="exact")
    try:
        assert _ids(served.search("blue shoe", 5)) == _ids(plain.search("blue shoe", 5))
        first = served.ids[0]
        for where in (None, {"kind": "dress"}):
            assert _ids(served.similar(first, 5, where)) == _ids(plain.similar(first, 5, where))
            assert first not in _ids(served.similar(first, 5, where))
    finally:
        served.searcher.close()
