"""What a new user meets first: one-line errors (missing GPU, missing or unwritable paths), --where that
ignores case and names the values that exist, the --html hint, the HTML page's alt text, the progress
bar hsl train leaves, and the Makefile's demo stores."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hsl.config import load_config
from hsl.extract import ExtractOptions, extract
from hsl.factory import create_model, save_model
from hsl.html import render_page
from hsl.search import Searcher
from hsl.store import FeatureStore
from hsl_cli.main import app

from .conftest import synthetic_photo, write_manifest

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 40-product tiny store, a random hsl-tiny model for it, and a plain file to put paths under."""
    root = tmp_path_factory.mktemp("shop")
    manifest = write_manifest(root / "shop", 40)
    store = root / "shop.h5"
    extract(manifest, store, ExtractOptions(backbone="tiny", workers=0))
    torch.manual_seed(0)
    save_model(create_model(load_config("hsl-tiny"), 32, 24), root / "model", {"backbone": "tiny"})
    (root / "a-file").write_text("not a folder")
    return {"root": root, "manifest": manifest, "store": store, "model": root / "model", "file": root / "a-file"}


def _one_line_error(args: list[str]) -> str:
    """Run an hsl command that must fail: exit 1 or 2, exactly one line on stderr, no traceback."""
    result = runner.invoke(app, args)
    assert result.exit_code in (1, 2), (args, result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), (args, result.exception)  # not an escaped exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    assert "Traceback" not in result.output and "Errno" not in lines[0], (args, lines[0])
    return lines[0]


def _quiet(command: str) -> list[str]:
    """--quiet where the command has it: a progress bar is not an error line."""
    return [] if command in ("eval", "info", "merge") else ["--quiet"]


def _commands(s: dict[str, Path]) -> dict[str, list[str]]:
    """Every command that takes --device, with arguments that would otherwise work."""
    store, model = str(s["store"]), str(s["model"])
    return {
        "extract": ["extract", str(s["manifest"]), "--store", str(s["root"] / "new.h5"), "--backbone", "tiny",
                    "--workers", "0"],
        "train": ["train", "--store", store, "--out", str(s["root"] / "trained"), "--config", "hsl-tiny"],
        "eval": ["eval", "--store", store, "--model", model],
        "query": ["query", "red shirt", "--store", store, "--model", model],
        "index": ["index", "--store", store, "--model", model],
        "serve": ["serve", "--store", store, "--model", model, "--port", "0"],
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: --device cuda would work")
@pytest.mark.parametrize("command", ["extract", "train", "eval", "query", "index", "serve"])
def test_device_cuda_without_a_gpu_is_one_line(shop: dict[str, Path], command: str) -> None:
    line = _one_line_error([*_commands(shop)[command], "--device", "cuda", *_quiet(command)])
    assert "no CUDA GPU" in line and "--device cpu" in line


@pytest.mark.parametrize("command", ["extract", "train", "eval", "query", "index", "serve"])
def test_unknown_device_is_a_usage_error(shop: dict[str, Path], command: str) -> None:
    assert "unknown device 'gpu'" in _one_line_error([*_commands(shop)[command], "--device", "gpu", *_quiet(command)])


# (arguments with {placeholders}, words the one line must hold)
BAD_PATHS = [
    (["extract", "{root}/no-such-folder", "--store", "{root}/x.h5"], "no-such-folder"),
    (["extract", "{manifest}", "--store", "{root}/no-dir/x.h5", "--backbone", "tiny"], "no-dir"),
    (["extract", "{manifest}", "--store", "{file}/x.h5", "--backbone", "tiny"], "not a folder"),
    (["info", "{root}/absent.h5"], "no such store"),
    (["merge", "{root}/absent.h5", "--store", "{root}/merged.h5"], "absent.h5"),
    (["train", "--store", "{root}/absent.h5", "--out", "{root}/m"], "no such store"),
    (["train", "--store", "{store}", "--out", "{file}/m", "--config", "hsl-tiny", "--val-fraction", "0.3"],
     "not a folder"),
    (["eval", "--store", "{store}", "--model", "{root}/no-model"], "no-model"),
    (["eval", "--store", "{store}", "--model", "{model}", "--queries", "{root}/nosuch.jsonl"], "--queries"),
    (["query", "red", "--store", "{root}/absent.h5", "--model", "{model}"], "no such store"),
    (["query", "red", "--store", "{store}", "--model", "{root}/no-model"], "no-model"),
    (["query", "--queries", "{root}/nosuch.txt", "--store", "{store}", "--model", "{model}"], "--queries"),
    (["query", "red", "--store", "{store}", "--model", "{model}", "--html", "{root}/no-dir/page.html"],
     "does not exist"),
    (["query", "red", "--store", "{store}", "--model", "{model}", "--html", "{file}/page.html"], "not a folder"),
    (["query", "red", "--store", "{store}", "--model", "{model}", "--html", "{root}"], "is a folder"),
    (["index", "--store", "{root}/absent.h5", "--model", "{model}"], "no such store"),
    (["serve", "--store", "{root}/absent.h5", "--model", "{model}", "--port", "0"], "no such store"),
]


@pytest.mark.parametrize(("args", "words"), BAD_PATHS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_PATHS])
def test_missing_and_unwritable_paths_are_one_line(shop: dict[str, Path], args: list[str], words: str) -> None:
    line = _one_line_error([arg.format(**shop) for arg in args] + _quiet(args[0]))
    assert words in line


def test_where_ignores_case_and_names_the_values_that_exist(shop: dict[str, Path]) -> None:
    base = ["query", "red shirt", "--store", str(shop["store"]), "--model", str(shop["model"]), "-k", "50", "--json"]
    exact = json.loads(runner.invoke(app, [*base, "--where", "colour=red"]).stdout)["results"]
    loud = json.loads(runner.invoke(app, [*base, "--where", "colour=RED"]).stdout)
    assert exact and [h["id"] for h in loud["results"]] == [h["id"] for h in exact]
    assert all(h["attributes"]["colour"] == "red" for h in exact)
    line = _one_line_error([*base, "--where", "colour=purple"])
    with FeatureStore.open(shop["store"]) as store:
        colours = store.attributes()["colour"]
    listed = line.split("colour has ")[1].split(", ")
    assert set(listed) == set(colours)
    counts = [colours.count(value) for value in listed]
    assert counts == sorted(counts, reverse=True)  # most frequent first
    assert "--where size=L: no such attribute column" in _one_line_error([*base, "--where", "size=L"])
    assert "--where colour=redd: no product has it (did you mean red?)" in _one_line_error([*base, "--where",
                                                                                           "colour=redd"])
    assert "--where 'colour': write it as COLUMN=VALUE" in _one_line_error([*base, "--where", "colour"])


def test_a_table_ends_with_the_html_hint(shop: dict[str, Path], tmp_path: Path) -> None:
    base = ["query", "red shirt", "--store", str(shop["store"]), "--model", str(shop["model"])]
    table = runner.invoke(app, [*base, "--where", "kind=shirt"])
    assert table.exit_code == 0, table.output
    hint = table.stderr.strip().splitlines()[-1]
    assert hint.startswith("to see the photos: ") and hint.endswith("--where kind=shirt --html page.html")
    assert "'red shirt'" in hint and str(shop["store"]) in hint
    page = tmp_path / "page.html"
    written = runner.invoke(app, [*base, "--html", str(page)])
    assert page.is_file() and "to see the photos:" not in written.stderr and "wrote" in written.stderr
    assert "to see the photos:" not in runner.invoke(app, [*base, "--quiet"]).stderr


def test_piped_table_keeps_paths_whole_and_relative(shop: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(shop["root"])
    result = runner.invoke(app, ["query", "red shirt", "--store", "shop.h5", "--model", "model", "-k", "3"])
    images = re.findall(r"shop/images/p\d+\.jpg", result.stdout)
    assert len(images) == 3 and str(shop["root"]) not in result.stdout  # whole, and relative to the folder


def test_page_without_titles_has_alt_text_and_names_each_product_once(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        synthetic_photo(i)[0].save(photos / f"item{i}.jpg")  # no sibling .txt: no titles
    store = tmp_path / "s.h5"
    extract(photos, store, ExtractOptions(backbone="tiny", workers=0))
    torch.manual_seed(1)
    save_model(create_model(load_config("hsl-tiny"), 32, 24), tmp_path / "m", {"backbone": "tiny"})
    result = Searcher(store, tmp_path / "m").search("red shirt", top_k=6)
    page = render_page([result])
    assert len(result.hits) == 6 and all(not hit.text for hit in result.hits)
    alts = re.findall(r'alt="([^"]*)"', page)
    assert len(alts) == 6 and all(alt.startswith("photo of product ") for alt in alts)
    for hit in result.hits:
        caption = re.search(rf"<b>{hit.rank}\.</b>(.*?)</figcaption>", page).group(1)
        assert caption.count(hit.id) == 1, caption
    # Such a store can be searched, not trained on: the error names the cause (no titles), not "run hsl extract".
    line = _one_line_error(["train", "--store", str(store), "--out", str(tmp_path / "t"), "--config", "hsl-tiny"])
    assert "none of its 6 products has a title" in line and "run hsl extract first" not in line
    where = _one_line_error(["query", "red", "--store", str(store), "--model", str(tmp_path / "m"), "--where",
                             "gender=Women", "--quiet"])
    assert "the store has no attribute columns" in where


def test_train_leaves_the_last_epochs_bar(shop: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--store", str(shop["store"]), "--out", str(tmp_path / "m"), "--config",
                                 "hsl-tiny", "--epochs", "3", "--val-fraction", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    train_size = json.loads(result.stdout)["split"]["train"]
    batch = load_config("hsl-tiny").training["batch_size"]
    steps = math.ceil(train_size / batch) - (train_size % batch == 1)  # a batch of one is skipped
    bars = re.findall(r"training\s.*?(\d+)/(\d+)", result.stderr)
    assert bars and bars[-1] == (str(steps), str(steps)), result.stderr  # one epoch's steps, not the run's or a mix


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_demo_stores(tmp_path: Path) -> None:
    def dry_run(*args: str) -> list[str]:
        done = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, check=True)
        return [line for line in done.stdout.splitlines() if "hsl " in line or line.startswith("rm ")]

    demo = dry_run("demo")
    assert "products.csv --store fashion.h5 --text-column productDisplayName" in demo[0]
    assert demo[1].endswith("--store fashion.h5 --top-k 5")
    for source, store in ((tmp_path / "pics", "demo-pics.h5"), (tmp_path / "pics/", "demo-pics.h5"),
                          (tmp_path / "shop" / "catalog.csv", "demo-catalog.h5")):
        own = dry_run("demo", f"PHOTOS={source}")
        assert all(f"--store {store}" in line for line in own) and "fashion.h5" not in " ".join(own)
    removed = dry_run("clean")[0].split()
    assert {"fashion.h5", "fashion.h5.index", "demo.h5.index", "demo-*.h5", "demo-*.h5.index"} <= set(removed)
    assert not np.isin(["*.h5", "model"], removed).any()  # never a user's own stores or models


def test_every_folder_with_files_is_a_declared_package() -> None:
    """setuptools warns "Package 'hsl.configs' is absent from the packages configuration" (dozens of lines
    on every install) for a folder of installed files that `packages` does not list."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setup = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    declared = set(setup["packages"])
    assert set(setup["package-data"]) <= declared
    for package, folder in setup["package-dir"].items():
        for sub in [REPO / folder, *(REPO / folder).rglob("*")]:
            if sub.is_dir() and sub.name != "__pycache__" and any(f.is_file() for f in sub.iterdir()):
                name = ".".join([package, *sub.relative_to(REPO / folder).parts])
                assert name in declared or package == "hsl_data", name
