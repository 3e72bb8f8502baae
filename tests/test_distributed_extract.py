"""`hsl extract` under torchrun (2 CPU processes, tiny backbone) and `hsl merge`: the merged store equals a
single-process run, a killed rank's shard resumes, merge refuses stores that do not belong together."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from hsl.errors import StoreMismatchError
from hsl.extract import ExtractOptions, extract
from hsl.merge import merge
from hsl.shards import shard_dir, shard_path
from hsl.store import DONE, PENDING, FeatureStore
from hsl_cli.main import app

from .conftest import big_photos, write_manifest

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "hsl_cli.main", "extract"]
ARGS = ["--backbone", "tiny", "--workers", "0", "--batch-size", "2", "--quiet", "--json"]
TINY = ExtractOptions(backbone="tiny", workers=0, batch_size=2)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FEATURES = ("image_global", "regions", "region_mask", "text_tokens", "text_lengths", "text_sentence")


def _torchrun(source: Path, store: Path, *extra: str) -> dict:
    done = subprocess.run([*TORCHRUN, str(source), "--store", str(store), *ARGS, *extra], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # rank 0's summary: the only line printed


def _assert_same_store(got: Path, want: Path) -> None:
    """Same rows in the same order, strings and status exactly, finished features within fp16 noise."""
    with FeatureStore.open(got) as a, FeatureStore.open(want) as b:
        assert a.row_plans() == b.row_plans()  # ids, images, texts, attributes, file stamps, status
        assert a.meta["attribute_columns"] == b.meta["attribute_columns"]
        done = np.flatnonzero(b.column("status") == DONE)
        mine, theirs = a.read_features(done), b.read_features(done)
    for name in FEATURES:
        np.testing.assert_allclose(mine[name].astype(np.float32), theirs[name].astype(np.float32), atol=2e-3)


def _shop(root: Path) -> Path:
    """20 products, a bad photo in each rank's half, a missing photo and a duplicate id."""
    bad = {"colour": "", "kind": ""}
    manifest = write_manifest(root, 20, [{"id": "gone", "image": "images/gone.jpg", "text": "missing", **bad},
                                         {"id": "p3", "image": "images/p1.jpg", "text": "duplicate", **bad},
                                         {"id": "cut", "image": "images/cut.jpg", "text": "truncated", **bad}])
    jpeg = (root / "images" / "p0.jpg").read_bytes()
    (root / "images" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # the last row: rank 1's share
    (root / "images" / "p2.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # early: rank 0's share
    return manifest


def test_two_processes_give_the_single_process_store_also_when_extending(tmp_path: Path) -> None:
    manifest = _shop(tmp_path / "shop")
    reference, store = tmp_path / "one.h5", tmp_path / "two.h5"
    first = extract(manifest, reference, ExtractOptions(backbone="tiny", workers=0, batch_size=2, limit=10))
    summary = _torchrun(manifest, store, "--limit", "10")
    _assert_same_store(store, reference)
    assert not shard_dir(store).exists()  # merged, then removed
    assert summary["skipped_by_reason"] == first.skipped_by_reason() and summary["processes"] == 2
    whole = extract(manifest, reference, TINY)  # the rest of the source, into the existing stores
    summary = _torchrun(manifest, store)
    _assert_same_store(store, reference)
    assert summary["skipped_by_reason"] == whole.skipped_by_reason() == {"truncated": 2, "missing_file": 1,
                                                                         "duplicate_id": 1}
    assert (summary["extracted"], summary["already_done"]) == (whole.extracted, whole.already_done) == (10, 9)



def _done_rows(path: Path) -> int:
    try:
        with FeatureStore.open(path) as shard:
            return int((shard.column("status") == DONE).sum())
    except Exception:  # not built yet, or caught mid-rename: ask again
        return 0


def _worker(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc")
def test_killed_rank_resumes_its_shard_and_the_merge_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    photos = big_photos(tmp_path / "photos", 64, size=900)
    reference, store = tmp_path / "one.h5", tmp_path / "two.h5"
    extract(photos, reference, TINY)
    job = subprocess.Popen([*TORCHRUN, str(photos), "--store", str(store), *ARGS], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = shard_path(store, 1, 2)
    deadline = time.monotonic() + 90
    while (seen := _done_rows(shard)) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert 0 < seen < 32, seen  # caught rank 1 mid-share
    os.kill(_worker(job.pid, 1), signal.SIGKILL)
    assert job.wait(timeout=90) != 0
    assert not store.exists() and shard.exists()  # no merge without every rank; the shards stay
    summary = _torchrun(photos, store)  # the same command again
    assert summary["already_done"] >= seen and summary["extracted"] + summary["already_done"] == 64
    _assert_same_store(store, reference)


def _parts(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A manifest of 8 products, and two stores of its halves (p0-p3, p4-p7)."""
    manifest = write_manifest(tmp_path / "shop", 8)
    lines = manifest.read_text().splitlines(keepends=True)
    halves = []
    for name, rows in (("a", lines[1:5]), ("b", lines[5:])):
        half = manifest.with_name(f"{name}.csv")
        half.write_text(lines[0] + "".join(rows))
        extract(half, tmp_path / f"{name}.h5", TINY)
        halves.append(tmp_path / f"{name}.h5")
    return manifest, *halves


def test_merge_is_the_whole_extraction_carries_pending_rows_and_is_idempotent(tmp_path: Path) -> None:
    manifest, a, b = _parts(tmp_path)
    reference, out = tmp_path / "one.h5", tmp_path / "merged.h5"
    extract(manifest, reference, TINY)
    with h5py.File(b, "r+") as f:  # p5 unfinished, as a kill leaves it
        f["status"][1] = PENDING
    report = merge([a, b], out)
    assert (report.rows, report.done, report.not_done) == (8, 7, 1)
    again = merge([a, b], out)  # into the existing store: every row replaced by itself
    assert (again.rows, again.replaced) == (8, 8)
    assert extract(manifest, out, TINY).extracted == 1  # a later extract finishes the pending row
    _assert_same_store(out, reference)
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--store", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["done"] == 8
    _assert_same_store(out, reference)


def test_merge_refuses_other_options_and_shared_ids(tmp_path: Path) -> None:
    manifest, a, b = _parts(tmp_path)
    other = tmp_path / "other.h5"
    extract(manifest.with_name("b.csv"), other, ExtractOptions(backbone="tiny", workers=0, max_text_tokens=8))
    runner, out = CliRunner(), tmp_path / "out.h5"
    result = runner.invoke(app, ["merge", str(a), str(other), "--store", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert result.stderr.strip() == (f"error: {other} has max_text_tokens 8, {a} has 16; merge only stores "
                                     "extracted with the same backbone and options")
    copy = shutil.copy(a, tmp_path / "copy.h5")
    with pytest.raises(StoreMismatchError) as caught:
        merge([a, b, copy], out)
    assert str(caught.value) == f"id 'p0' is in both {a} and {copy}; shards must hold disjoint products"
    assert runner.invoke(app, ["merge", str(a), str(a), "--store", str(out)]).exit_code == 2
    assert runner.invoke(app, ["merge", "--store", str(out)]).exit_code == 2
