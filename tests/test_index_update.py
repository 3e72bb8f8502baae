"""An index follows its store by updating only what changed: new and re-extracted products are
encoded, products that are no longer extracted never come back, and the result equals a full build."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from hsl.extract import ExtractOptions, extract
from hsl.factory import create_model, save_model
from hsl.index_cache import index_path
from hsl.search import Searcher

from .conftest import synthetic_photo, write_manifest

TINY = ExtractOptions(backbone="tiny", workers=0)


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(manifest, store, model) of 60 extracted products and a random fp32-comparable model."""
    import torch

    root = tmp_path / "shop"
    manifest = write_manifest(root, 60)
    extract(manifest, root / "s.h5", TINY)
    torch.manual_seed(0)
    save_model(create_model("hsl-tiny", 32, 24), tmp_path / "m", {"backbone": "tiny"})
    return manifest, root / "s.h5", tmp_path / "m"


def _change_the_shop(manifest: Path) -> None:
    """2 photos replaced by others, 1 by a file that is not a photo (it fails: dropped), 4 new products."""
    images = manifest.parent / "images"
    for i, other in ((3, 70), (40, 72)):
        synthetic_photo(other)[0].save(images / f"p{i}.jpg")
    (images / "p25.jpg").write_bytes(b"no longer a photo")
    lines = []
    for i in range(60, 64):
        image, title = synthetic_photo(i)
        image.save(images / f"p{i}.jpg")
        lines.append(f"p{i},images/p{i}.jpg,{title},{title.split()[0]},{title.split()[1]}\n")
    with open(manifest, "a", encoding="utf-8") as handle:
        handle.writelines(lines)


def _results(searcher: Searcher, text: str = "red shirt") -> list[tuple[str, float]]:
    return [(h.id, round(h.score, 4)) for h in searcher.search(text, top_k=64).hits]


@pytest.mark.parametrize("backend", ["exact", "ivf"])
def test_update_encodes_only_the_changed_products_and_equals_a_full_build(shop: tuple, tmp_path: Path,
                                                                        backend: str) -> None:
    manifest, store, model = shop
    totals: list[int] = []
    before = Searcher(store, model, backend=backend, nprobe=4096, precision="fp32",
                      progress=lambda done, total: totals.append(total))
    assert totals == [60]
    before.close()  # as when the query that built it has ended
    _change_the_shop(manifest)
    report = extract(manifest, store, TINY)
    assert report.extracted == 6 and [s.id for s in report.skipped] == ["p25"]

    updated = Searcher(store, model, backend=backend, nprobe=4096, precision="fp32",
                       progress=lambda done, total: totals.append(total))
    assert totals[1:] == [6]  # 2 changed + 4 new photos encoded, nothing else
    assert updated.index.generation == before.index.generation + 1
    ids = [h.id for h in updated.search("red shirt", top_k=1000).hits]
    assert "p25" not in ids and len(ids) == 63  # the failed product is gone, every other one is there

    fresh_store = tmp_path / "fresh.h5"
    shutil.copy(store, fresh_store)  # the same rows, indexed from scratch
    fresh = Searcher(fresh_store, model, backend=backend, nprobe=4096, precision="fp32")
    assert _results(updated) == _results(fresh)
    assert _results(updated, "blue trousers") == _results(fresh, "blue trousers")
    if backend == "ivf":  # the IVF file of the new generation was made from the old one, which is gone
        files = sorted(p.name for p in index_path(store, updated.model_key).parent.glob("*.faiss"))
        assert files == [f"{updated.model_key}.g1.ivf.faiss"]


def test_a_killed_update_is_rebuilt_not_trusted(shop: tuple) -> None:
    manifest, store, model = shop
    first = Searcher(store, model, precision="fp32")
    want = _results(first)
    path = first.index.path
    first.close()
    _change_the_shop(manifest)
    extract(manifest, store, TINY)
    with h5py.File(path, "r+") as f:  # what a kill in the middle of an update leaves
        f.attrs["updating"] = True
    totals: list[int] = []
    again = Searcher(store, model, precision="fp32", progress=lambda done, total: totals.append(total))
    assert totals == [63]  # a full build of every extracted product
    assert again.index.generation == 0 and want != _results(again)
    with h5py.File(again.index.path) as f:
        assert not f.attrs.get("updating", False)
        assert np.all(f["rows"][:f.attrs["count"]] >= 0)


def test_a_cache_open_for_reading_is_replaced_not_changed_under_the_reader(shop: tuple) -> None:
    """hsl serve keeps the cache open: an update elsewhere then writes a new file, and the reader keeps
    answering from the one it has, unchanged."""
    manifest, store, model = shop
    reader = Searcher(store, model, backend="ivf", nprobe=4096, precision="fp32")
    want = _results(reader)
    _change_the_shop(manifest)
    extract(manifest, store, TINY)
    totals: list[int] = []
    other = Searcher(store, model, backend="ivf", nprobe=4096, precision="fp32",
                     progress=lambda done, total: totals.append(total))
    assert totals == [63] and other.index.generation == 0  # a full build, renamed over the old file
    assert _results(reader) == want and "p25" not in [h.id for h in other.search("x", top_k=100).hits]


def _hit_strings(searcher: Searcher, text: str = "red shirt") -> list[tuple]:
    return [(h.id, h.text, h.image, h.attributes) for h in searcher.search(text, top_k=64).hits]


def test_hits_come_from_the_cache_records_and_follow_an_edited_title(shop: tuple) -> None:
    """The hits' strings are read from the index cache's records (hsl/hit_records.py), equal the store's,
    and a title edited in the manifest (the photo unchanged, so no vector changes) shows at once."""
    manifest, store, model = shop
    first = Searcher(store, model, precision="fp32")
    assert first.records.available
    from_records = _hit_strings(first)
    first.records.available = False  # the store's own strings, as for a cache without records
    assert _hit_strings(first) == from_records
    first.close()

    text = manifest.read_text(encoding="utf-8").replace("p7,images/p7.jpg,", "p7,images/p7.jpg,Edited title ", 1)
    manifest.write_text(text, encoding="utf-8")
    extract(manifest, store, TINY)
    totals: list[int] = []
    again = Searcher(store, model, precision="fp32", progress=lambda done, total: totals.append(total))
    assert again.records.available and sum(totals) <= 1  # no product re-encoded but (at most) the edited one
    titles = {h.id: h.text for h in again.search("x", top_k=64).hits}
    before = {hit_id: title for hit_id, title, _, _ in from_records}
    assert titles["p7"] == "Edited title " + before["p7"] and titles["p8"] == before["p8"]
    again.records.available = False
    assert {h.id: h.text for h in again.search("x", top_k=64).hits} == titles


def test_a_cache_without_records_gets_them_at_its_next_update(shop: tuple) -> None:
    manifest, store, model = shop
    first = Searcher(store, model, precision="fp32")
    want = _hit_strings(first)
    path = first.index.path
    first.close()
    with h5py.File(path, "r+") as f:  # a cache as the versions before the records wrote it
        for name in ("record_blob", "record_start", "record_len"):
            del f[name]
    older = Searcher(store, model, precision="fp32")
    assert not older.records.available and _hit_strings(older) == want  # read from the store instead
    older.close()
    _change_the_shop(manifest)
    extract(manifest, store, TINY)
    updated = Searcher(store, model, precision="fp32")
    assert updated.records.available and updated.index.generation == 1
    from_records = _hit_strings(updated)
    updated.records.available = False
    assert _hit_strings(updated) == from_records and "p25" not in [h[0] for h in from_records]
