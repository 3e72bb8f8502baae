"""The writer's lock (STORE.lock), the words for a store that is busy or broken, and photo folders
kept behind links."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hsl.errors import HSLError, StoreInUseError
from hsl.extract import ExtractOptions, extract
from hsl.store import FeatureStore
from hsl.store_lock import lock_path, writing
from hsl_data.sources import read_source

from .conftest import write_folder, write_manifest

TINY = ExtractOptions(backbone="tiny", workers=0)
TAKE_LOCK = "from hsl.store_lock import writing\nwith writing({store!r}, 'test'):\n    print('held', flush=True)\n" \
            "    input()\n"


def test_a_second_process_is_refused_with_the_holders_pid_and_the_lock_goes_with_its_holder(tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    holder = subprocess.Popen([sys.executable, "-c", TAKE_LOCK.format(store=str(store))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(StoreInUseError) as refused, writing(store, "hsl extract"):
        pass
    message = str(refused.value)
    assert f"is in use: process {holder.pid} (test) is writing it" in message
    assert "re-create" not in message and "delete" not in message and " on " not in message  # same machine
    holder.kill()  # as `kill -9` does: nothing cleans up, the kernel drops the lock
    holder.wait()
    assert lock_path(store).exists()
    with writing(store, "hsl extract"):
        with writing(store, "hsl merge"):  # the same process may nest its own lock (rank 0 merging)
            pass
        with pytest.raises(StoreInUseError):  # still held after the inner block: other processes stay out
            _raises_in_child(store)
    assert not lock_path(store).exists()  # a finished writer leaves nothing beside the store


def _raises_in_child(store: Path) -> None:
    child = subprocess.run([sys.executable, "-c", TAKE_LOCK.format(store=str(store))], input="\n", text=True,
                           capture_output=True)
    if child.returncode and "StoreInUseError" in child.stderr:
        raise StoreInUseError(store, None)


def test_a_lock_held_by_this_process_keeps_others_out(tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    with writing(store, "hsl extract"):
        with pytest.raises(StoreInUseError):
            _raises_in_child(store)
    _raises_in_child(store)  # released: the child takes it


def test_store_messages_say_what_is_true(tmp_path: Path) -> None:
    write_manifest(tmp_path / "shop", 4)
    store = tmp_path / "s.h5"
    extract(tmp_path / "shop" / "products.csv", store, TINY)
    data = store.read_bytes()
    broken = tmp_path / "broken.h5"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(HSLError) as damaged:
        FeatureStore.open(broken)
    assert f"move it aside (e.g. to {broken}.damaged)" in str(damaged.value)
    assert "delete" not in str(damaged.value) and "re-create" not in str(damaged.value)
    words = tmp_path / "words.h5"
    words.write_text("not hdf5")
    with pytest.raises(HSLError, match="not an HDF5 file .no HDF5 signature., so not an hsl store"):
        FeatureStore.open(words)
    if os.geteuid() != 0:  # root reads anything
        store.chmod(0)
        with pytest.raises(HSLError, match="permission denied"):
            FeatureStore.open(store)


def test_a_photo_folder_behind_a_link_inside_the_manifests_folder_is_read(tmp_path: Path) -> None:
    shop = tmp_path / "catalog"
    write_manifest(tmp_path / "elsewhere", 6)  # photos on "another disk"
    shop.mkdir()
    (shop / "products.csv").write_text((tmp_path / "elsewhere" / "products.csv").read_text())
    (shop / "images").symlink_to(tmp_path / "elsewhere" / "images", target_is_directory=True)
    report = extract(shop / "products.csv", tmp_path / "s.h5", TINY)
    assert report.extracted == 6 and not report.skipped
    (tmp_path / "secret.jpg").write_bytes((tmp_path / "elsewhere" / "images" / "p0.jpg").read_bytes())
    with open(shop / "products.csv", "a", encoding="utf-8") as rows:  # a manifest naming files elsewhere
        rows.write("up,../secret.jpg,up,,\n")
        rows.write(f"abs,{tmp_path / 'secret.jpg'},abs,,\n")
        rows.write("sneaky,images/../../secret.jpg,sneaky,,\n")
    listing = read_source(shop / "products.csv")
    assert {r.id: r.reason for r in listing.rejected} == {"up": "outside_folder", "abs": "outside_folder",
                                                          "sneaky": "outside_folder"}
    assert len(listing.items) == 6


def test_a_linked_sub_folder_of_a_photo_folder_is_read_once(tmp_path: Path) -> None:
    write_folder(tmp_path / "disk", 4)
    root = tmp_path / "photos"
    root.mkdir()
    (root / "linked").symlink_to(tmp_path / "disk", target_is_directory=True)
    (root / "linked" / "loop").symlink_to(root, target_is_directory=True)  # a loop must not recurse forever
    listing = read_source(root)
    assert len(listing.items) == 4 and all(item.id.startswith("linked/") for item in listing.items)
