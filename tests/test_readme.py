"""The README, run: every command of its ```bash blocks that can run here, in order, in a temp folder.

What the test changes, and why (nothing else is changed; each skipped command is listed with its reason):

- The folder it runs in mimics a checkout beside the shared data: `../shared/data/fashion/` holds the
  first SLICE products of the shared catalog (products.csv rows and their photos, copied), so the
  README's paths work as written and a run takes a couple of minutes, not the full catalog's.
  `data/` is the repository's own (symlinked) for `data/queries/...`.
- `./catalog` (the README's folder example) is made from the slice's first photos with their titles in
  sibling .txt files; `~/shop/pics` (HOME is the temp folder) from a few more photos, no titles.
- `make demo ...` runs the commands `make -n demo ...` prints for this repository's Makefile, with
  `.venv/bin/hsl` as the `hsl` under test.
- `hsl` commands run in this process (CliRunner: one torch import, not twenty); `hsl serve` and
  `torchrun` run as processes. `--nproc-per-node 4` becomes 2 (this machine's cores).
- `[optional]` parts are all included, so every option the README shows is tried (`[--device cuda]`
  only on a machine with a GPU); `--port 8000`
  becomes `--port 0` (a free port). `hsl serve` is asked for /search and then stopped with Ctrl-C.
- `hsl train` gets `--epochs 1` (the configs' 10 epochs take minutes even on the slice); the commands
  after it then run on a model trained for one epoch, which is all they need.
- `hsl merge part-a.h5 part-b.h5` needs two shard stores the README does not make: they are extracted
  from two more small folders first, with the options of catalog.h5.

A command fails the test if it exits non-zero or prints a traceback.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from hsl_cli.main import app

from .conftest import FASHION

REPO = Path(__file__).resolve().parents[1]
SLICE = 200  # products of the shared catalog the README's commands run on
CATALOG_PHOTOS = 24  # ./catalog
BIN = Path(sys.executable).parent

SKIP = [  # (a word or phrase in the command, why it cannot run here)
    ("make test", "it is this test suite"),
    ("--nnodes 2", "needs a second machine"),
    ("data/train/", "needs the KDD Cup 2020 files (not downloadable here)"),
    ("data/valid/", "needs the KDD Cup 2020 files (not downloadable here)"),
    ("kdd-", "needs the KDD Cup 2020 files (not downloadable here)"),
    ("openclip:", "downloads OpenCLIP weights"),
]


def readme_commands(text: str) -> list[str]:
    """Each command of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def with_optionals(command: str) -> list[str]:
    """`hsl info fashion.h5 [--json]` -> the words with every [optional] part included ([--device cuda]
    only where torch sees a GPU)."""
    words, group = [], None
    for word in shlex.split(command):
        if word.startswith("["):
            group = []
        (words if group is None else group).append(word.strip("[]"))
        if word.endswith("]"):
            if group != ["--device", "cuda"] or torch.cuda.is_available():
                words += group
            group = None
    return [word for word in words if word]


def skip_reason(command: str) -> str | None:
    if "--device cuda" in command and "[--device cuda]" not in command:
        return "needs a GPU"
    return next((why for phrase, why in SKIP if phrase in command), None)


def _copy_photos(rows: list[dict], folder: Path, titles: bool) -> None:
    folder.mkdir(parents=True)
    for row in rows:
        shutil.copy(FASHION / "images" / f"{row['id']}.jpg", folder / f"{row['id']}.jpg")
        if titles:
            (folder / f"{row['id']}.txt").write_text(row["productDisplayName"], encoding="utf-8")


@pytest.fixture
def checkout(fashion: Path, tmp_path: Path) -> Path:
    """tmp/work (where the commands run) beside tmp/shared/data/fashion (the slice); see the docstring."""
    with open(fashion / "products.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames
        rows = [row for _, row in zip(range(SLICE + 3 * 12), reader, strict=False)]
    catalog, extra = rows[:SLICE], rows[SLICE:]
    sliced = tmp_path / "shared" / "data" / "fashion"
    _copy_photos(catalog, sliced / "images", titles=False)
    with open(sliced / "products.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(catalog)
    work = tmp_path / "work"
    _copy_photos(catalog[:CATALOG_PHOTOS], work / "catalog", titles=True)
    _copy_photos(extra[:12], work / "catalog-a", titles=True)  # the shards hsl merge joins
    _copy_photos(extra[12:24], work / "catalog-b", titles=True)
    _copy_photos(extra[24:36], tmp_path / "home" / "shop" / "pics", titles=False)
    (work / "data").symlink_to(REPO / "data")
    return work


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(work.parent / "home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1"}


def _no_traceback(command: str, output: str) -> None:
    assert "Traceback (most recent call last)" not in output, f"{command}\n{output}"


def run_hsl(words: list[str], work: Path) -> str:
    """One `hsl` command in this process; fails on a non-zero exit or an escaped exception."""
    words = [os.path.expanduser(word) for word in words]
    result = CliRunner().invoke(app, words[1:])
    command = shlex.join(words)
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{command}: {result.exception!r}"
    assert result.exit_code == 0, f"{command} exited {result.exit_code}\n{result.output}"
    _no_traceback(command, result.output)
    return result.output


def run_make(words: list[str], work: Path) -> list[str]:
    """The commands `make -n` prints for this repository's Makefile, each run here as a README command."""
    printed = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), *words[1:]],
                             capture_output=True, text=True, check=True, env=_env(work)).stdout
    hsl = [line.split(maxsplit=1)[1] for line in printed.splitlines() if line.startswith(".venv/bin/hsl ")]
    assert hsl, f"{shlex.join(words)} runs no hsl command:\n{printed}"
    for line in hsl:
        run_hsl(["hsl", *shlex.split(line)], work)
    return hsl


def run_process(words: list[str], work: Path) -> None:
    done = subprocess.run(words, cwd=work, capture_output=True, text=True, env=_env(work), timeout=300)
    output = done.stdout + done.stderr
    errors = "\n".join(line for line in output.splitlines() if line.startswith("error:"))  # ours, not torchrun's
    assert done.returncode == 0, f"{shlex.join(words)} exited {done.returncode}\n{errors}\n{output[-2000:]}"
    _no_traceback(shlex.join(words), output)


def run_serve(words: list[str], work: Path) -> None:
    """Start the server, search once (and once with an empty query: 400), stop it with Ctrl-C."""
    if "--port" in words:
        words[words.index("--port") + 1] = "0"
    server = subprocess.Popen(words, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(work))  # two requests: the pipes never fill
    try:
        lines, url, deadline = [], None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            if not line:
                break
            lines.append(line)
            url = next(iter(re.findall(r"listening on (http://\S+)", line)), None)
        assert url, "hsl serve did not start:\n" + "".join(lines)
        found = httpx.get(f"{url}/search", params={"q": "red floral summer dress", "where": "gender=women"}, timeout=60)
        assert found.status_code == 200 and found.json()["results"], found.text
        assert all(hit["attributes"]["gender"] == "Women" for hit in found.json()["results"])
        empty = httpx.get(f"{url}/search", params={"q": ""}, timeout=60)
        assert empty.status_code == 400 and isinstance(empty.json()["detail"], str), empty.text
    finally:
        server.send_signal(signal.SIGINT)
        try:
            rest = "".join(server.communicate(timeout=30))
        except subprocess.TimeoutExpired:
            server.kill()
            rest = "".join(server.communicate()) + "\n(did not stop within 30 s of Ctrl-C)"
    assert server.returncode == 0, "".join(lines) + rest
    _no_traceback(shlex.join(words), "".join(lines) + rest)


def test_readme_commands_run(checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    work = checkout
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work.parent / "home"))
    ran, skipped = [], []
    for command in readme_commands((REPO / "README.md").read_text(encoding="utf-8")):
        reason = skip_reason(command)
        if reason:
            skipped.append(f"{command}  ({reason})")
            continue
        words = with_optionals(command)
        if "train" in words:  # hsl train and torchrun ... train: one epoch (see the docstring)
            words += ["--epochs", "1"]
        started = time.monotonic()
        if words[0] == "make":
            run_make(words, work)
        elif words[0] == "torchrun":
            words = [str(BIN / "torchrun"), *words[1:]]
            words[words.index("--nproc-per-node") + 1] = "2"  # this machine's cores (see the docstring)
            run_process(words, work)
        elif words[:2] == ["hsl", "serve"]:
            run_serve([str(BIN / "hsl"), *words[1:]], work)
        else:
            if words[:2] == ["hsl", "merge"]:  # its shards, extracted like catalog.h5 (see the docstring)
                run_hsl(["hsl", "extract", "catalog-a", "--store", "part-a.h5", "--quiet"], work)
                run_hsl(["hsl", "extract", "catalog-b", "--store", "part-b.h5", "--quiet"], work)
            run_hsl(words, work)
        ran.append(f"{time.monotonic() - started:5.1f}s  {shlex.join(words)}")
        print(f"README: {ran[-1]}", flush=True)  # shown by `pytest -s`, and with a failure's report
    print("README, skipped:\n  " + "\n  ".join(skipped))
    kinds = {" ".join(line.split()[1:3]) for line in ran}  # every kind of command the README shows was found
    assert {"make demo", "hsl extract", "hsl info", "hsl train", "hsl eval", "hsl query", "hsl merge",
            "hsl serve"} <= kinds, kinds
    assert (work / "model" / "model.safetensors").is_file()
    assert (work / "fashion.h5").is_file() and (work / "demo-pics.h5").is_file() and (work / "page.html").is_file()
