"""What hsl survives: kills, a full disk, a reader beside a writer, broken and hostile inputs,
tampered files. Each case is recorded for docs/reliability.md (see conftest.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hsl.extract import ExtractOptions, extract
from hsl.factory import create_model, save_model
from hsl.search import Searcher

from .conftest import big_photos, store_features, synthetic_photo, write_manifest

FAULTS = "faults"
HSL = [sys.executable, "-m", "hsl_cli.main"]
KILLS = 20


def _other_weights(folder: Path, scratch: Path) -> None:
    save_model(create_model("hsl-tiny", 8, 24), scratch, {"backbone": "tiny"})
    (scratch / "model.safetensors").replace(folder / "model.safetensors")


def _limited(limit_bytes: int):
    """preexec_fn: a file-size limit that makes writes fail like a full disk (EFBIG, not a signal)."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_disk_full_gives_a_clear_error_and_keeps_the_store(tmp_path: Path, reliability) -> None:
    root = tmp_path / "shop"
    manifest = write_manifest(root, 30)
    store = tmp_path / "s.h5"
    base = [*HSL, "extract", str(manifest), "--backbone", "tiny", "--workers", "0", "--quiet", "--store"]
    full = subprocess.run(base + [str(tmp_path / "new.h5")], capture_output=True, text=True,
                          preexec_fn=_limited(20_000))
    assert full.returncode == 1 and "not enough room" in full.stderr and "Traceback" not in full.stderr
    assert not (tmp_path / "new.h5").exists() and not (tmp_path / "new.h5.tmp").exists()
    subprocess.run(base + [str(store)], check=True, capture_output=True)
    before = store.read_bytes()
    write_manifest(root, 300)  # ten times the products: the rebuilt file needs more room
    grow = subprocess.run(base + [str(store)], capture_output=True, text=True,
                          preexec_fn=_limited(len(before) + 10_000))
    assert grow.returncode == 1 and "the existing store is unchanged" in grow.stderr
    assert store.read_bytes() == before and "Traceback" not in grow.stderr
    reliability(FAULTS, "disk full (file-size limit) while creating a store", 1,
                "exit 1, one-line error, no partial file left")
    reliability(FAULTS, "disk full while growing an existing store", 1,
                "exit 1, one-line error, the existing store byte-identical")


def test_reader_beside_a_writer_sees_a_consistent_snapshot(tmp_path: Path, reliability) -> None:
    photos = big_photos(tmp_path / "photos", 300)
    base = [*HSL, "extract", str(photos), "--backbone", "tiny", "--workers", "0", "--batch-size", "4", "--quiet",
            "--store"]
    subprocess.run(base + [str(tmp_path / "reference.h5")], check=True, capture_output=True)
    want = store_features(tmp_path / "reference.h5")
    position = {pid: i for i, pid in enumerate(want["ids"])}
    store = tmp_path / "s.h5"
    proc = subprocess.Popen(base + [str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reads = partial = 0
    while proc.poll() is None:
        if store.exists():
            got = store_features(store)  # a reader while `hsl extract` writes the same file
            for i, pid in enumerate(got["ids"]):
                np.testing.assert_allclose(got["regions"][i], want["regions"][position[pid]], atol=2e-3)
            reads += 1
            partial += 0 < len(got["ids"]) < 300
        time.sleep(0.05)
    assert proc.returncode == 0 and reads >= 3 and partial >= 1, (reads, partial)
    reliability(FAULTS, "reader (query path) while `hsl extract` writes the same store", reads,
                f"no error; every row marked done had its final features ({partial} reads saw a partial store)")


def test_tampered_files_give_clear_errors_and_run_no_code(tiny_store: Path, tmp_path: Path, reliability) -> None:
    from typer.testing import CliRunner

    from hsl_cli.main import app

    runner = CliRunner()

    def one_line_error(args: list[str], code: int = 1) -> str:
        result = runner.invoke(app, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code == code, (args, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        return lines[0]

    data = tiny_store.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 3])
    corrupted = tmp_path / "corrupted.h5"
    corrupted.write_bytes(data[:512] + bytes(len(data) - 1024) + data[-512:])
    for path, case in ((truncated, "truncated store"), (corrupted, "store with zeroed middle bytes")):
        one_line_error(["info", str(path)])
        reliability("tampered files", case, 1, "`hsl info`: exit 1, one-line error")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1]
    assert "not an hsl store" in one_line_error(["info", str(tmp_path / "foreign.h5")])
    reliability("tampered files", "HDF5 file that is not a store", 1, "exit 1, says it is not an hsl store")

    torch.manual_seed(0)
    good = tmp_path / "model"
    save_model(create_model("hsl-tiny", 32, 24), good, {"backbone": "tiny"})
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    cases = {"model folder without config.json": lambda d: (d / "config.json").unlink(),
             "model folder without model.safetensors": lambda d: (d / "model.safetensors").unlink(),
             "config.json that is not JSON": lambda d: (d / "config.json").write_text("{not json"),
             "weights replaced by a pickle with code in it": lambda d: torch.save({"x": Payload()},
                                                                                    d / "model.safetensors"),
             "weights of another architecture": lambda d: _other_weights(d, tmp_path / "other")}
    import shutil

    for case, damage in cases.items():
        broken = tmp_path / f"broken-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, broken)
        damage(broken)
        one_line_error(["query", "red shirt", "--store", str(tiny_store), "--model", str(broken), "--quiet"])
        one_line_error(["eval", "--store", str(tiny_store), "--model", str(broken)])
        reliability("tampered files", case, 2, "`hsl query` and `hsl eval`: exit 1, one-line error naming the file")
    assert not marker.exists()  # the pickle's code never ran

    cache = Searcher(tiny_store, good).index.path
    cache.write_bytes(b"garbage")
    assert len(Searcher(tiny_store, good).search("red shirt").hits) == 10
    reliability("tampered files", "corrupted index cache", 1, "ignored and rebuilt; the query answers")
    sources = [p for folder in ("hsl", "cli", "data") for p in (Path(__file__).parents[1] / folder).rglob("*.py")]
    for source in sources:
        text = source.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, source
        assert text.count("torch.load(") == text.count("weights_only=True"), source
    reliability("tampered files", "code scan: no pickle loading in hsl/, cli/, data/", len(sources),
                "only torch.load(weights_only=True) for the packaged EfficientNet weights")


def test_output_safety(tiny_store: Path, tmp_path: Path, reliability) -> None:
    from hsl.html import render_page
    from hsl.search import Hit, SearchResult

    hostile = ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>', "</figcaption><iframe src=//x>"]
    page = render_page([SearchResult(q, [Hit(1, q, 1.0, "/nowhere.jpg", q, {"k": q})]) for q in hostile])
    for text in hostile:
        assert text not in page
    assert "<script>" not in page and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    reliability("output safety", "HTML/JS in titles, queries and attributes of an --html page", len(hostile),
                "escaped: no tag from product text reaches the page")

    root = tmp_path / "shop"
    manifest = write_manifest(root, 3, [
        {"id": "up", "image": "../secret.jpg", "text": "up", "colour": "", "kind": ""},
        {"id": "abs", "image": str(tmp_path / "secret.jpg"), "text": "abs", "colour": "", "kind": ""}])
    synthetic_photo(5)[0].save(tmp_path / "secret.jpg")
    report = extract(manifest, tmp_path / "a.h5", ExtractOptions(backbone="tiny", workers=0))
    assert {s.id: s.reason for s in report.skipped} == {"up": "outside_folder", "abs": "outside_folder"}
    allowed = extract(manifest, tmp_path / "b.h5", ExtractOptions(backbone="tiny", workers=0, allow_outside=True))
    assert allowed.extracted == 5
    reliability("output safety", "manifest paths leaving its folder (../ and absolute)", 2,
                "refused and reported (outside_folder) unless --allow-outside")


BAD_INPUTS = "bad inputs"


def _photo_corpus(images: Path) -> dict[str, str | None]:
    """file name -> the skip reason expected (None: must be extracted)."""
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.new("RGB", (1, 5000), (200, 10, 10)).save(images / "tall.png")
    Image.new("RGB", (5000, 1), (10, 200, 10)).save(images / "wide.png")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(images / "pixel.png")
    frames = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)) for _ in range(3)]
    frames[0].save(images / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[0].save(images / "anim-webp.webp", save_all=True, append_images=frames[1:], duration=50)
    Image.new("L", (20000, 20000)).save(images / "huge.png")  # 400 Mpx: a decompression bomb
    Image.new("L", (30, 30), 128).save(images / "grey.png")
    Image.new("CMYK", (30, 30), (0, 100, 0, 0)).save(images / "cmyk.jpg")
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(images / "clear.png")
    Image.fromarray(np.full((30, 30), 50000, np.uint16)).save(images / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (40, 20), (5, 5, 200)).save(images / "rotated.jpg", exif=exif)
    (images / "empty.jpg").write_bytes(b"")
    (images / "words.jpg").write_text("not a photo")
    good = images / "pixel.png"
    (images / "truncated.jpg").write_bytes((lambda b: b[: len(b) // 2])(_jpeg_bytes(rng)))
    del good
    return {"tall.png": None, "wide.png": None, "pixel.png": None, "anim.gif": None, "anim-webp.webp": None,
            "huge.png": "too_many_pixels", "grey.png": None, "cmyk.jpg": None, "clear.png": None, "deep.png": None,
            "rotated.jpg": None, "empty.jpg": "empty_file", "words.jpg": "not_an_image", "truncated.jpg": "truncated"}


def _jpeg_bytes(rng: np.random.Generator) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_bad_photo_corpus(tmp_path: Path, reliability) -> None:
    expected = _photo_corpus(tmp_path / "photos")
    report = extract(tmp_path / "photos", tmp_path / "s.h5", ExtractOptions(backbone="tiny", workers=0))
    reasons = {Path(s.image).name: s.reason for s in report.skipped}
    assert reasons == {name: reason for name, reason in expected.items() if reason}
    assert report.extracted == sum(reason is None for reason in expected.values())
    for name, reason in expected.items():
        reliability(BAD_INPUTS, f"photo: {name}", 1, f"skipped and reported as {reason}" if reason else "extracted")


MANIFESTS = {
    "latin-1 encoded CSV": (b"id,image,text\n1,images/p0.jpg,caf\xe9 shirt\n", 1, "not UTF-8"),
    "missing text column": (b"id,image,title\n1,images/p0.jpg,x\n", 2, "no column 'text'"),
    "unclosed quote": (b'id,image,text\n1,images/p0.jpg,"red shirt\n2,images/p1.jpg,blue\n', 0, None),
    "row with extra fields": (b"id,image,text\n1,images/p0.jpg,red,extra,more\n2,images/p1.jpg,blue\n", 0, None),
    "row with too few fields": (b"id,image,text\n1,images/p0.jpg\n2,images/p1.jpg,blue\n", 0, None),
    "UTF-8 BOM": (b"\xef\xbb\xbfid,image,text\n1,images/p0.jpg,red\n", 0, None),
    "100,000 columns": (("id,image,text," + ",".join(f"c{i}" for i in range(100_000)) + "\n1,images/p0.jpg,red"
                         + "," * 100_000 + "\n").encode(), 2, "at most 1000 attribute"),
    "empty file": (b"", 2, "empty"),
    "header only": (b"id,image,text\n", 0, None),
    "duplicate column names": (b"id,image,text,kind,kind\n1,images/p0.jpg,red,a,b\n", 2, "appears twice"),
    "nameless column": (b"id,image,text,\n1,images/p0.jpg,red,x\n", 2, "has no name"),
    "NUL bytes in a row": (b"id,image,text\n1,images/p0.jpg,re\x00d\n", 0, None),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_broken_manifests(case: str, tmp_path: Path, reliability) -> None:
    from typer.testing import CliRunner

    from hsl_cli.main import app

    content, code, message = MANIFESTS[case]
    write_manifest(tmp_path, 2)
    (tmp_path / "products.csv").write_bytes(content)
    result = CliRunner().invoke(app, ["extract", str(tmp_path / "products.csv"), "--store", str(tmp_path / "s.h5"),
                                      "--backbone", "tiny", "--workers", "0", "--quiet"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    if message:
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    reliability(BAD_INPUTS, f"manifest: {case}", 1,
                f"exit {code}, one-line error" if message else "exit 0; bad rows reported and skipped")


HOSTILE_QUERIES = {"empty": ("", 2), "whitespace and control characters": ("\t\x00\x1b\n\x7f", 2),
                   "1 MB of text": ("red " * 262_144, 0), "right-to-left": ("שמלה אדומה \u202eesrever", 0),
                   "emoji": ("👗🔥 dress", 0), "only punctuation": ("?!...", 0),
                   "SQL-looking": ("'; DROP TABLE x;--", 0)}


def test_hostile_queries(tiny_store: Path, tmp_path: Path, reliability) -> None:
    from typer.testing import CliRunner

    from hsl_cli.main import app

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    save_model(create_model("hsl-tiny", 32, 24), model_dir, {"backbone": "tiny"})
    runner = CliRunner()
    for case, (text, code) in HOSTILE_QUERIES.items():
        result = runner.invoke(app, ["query", text, "--store", str(tiny_store), "--model", str(model_dir), "--json",
                                     "--quiet"])
        assert result.exception is None or isinstance(result.exception, SystemExit), (case, result.exception)
        assert result.exit_code == code, (case, result.output)
        if code == 0:
            assert len(json.loads(result.stdout)["results"]) == 10
        reliability(BAD_INPUTS, f"query: {case}", 1, "answered" if code == 0 else "exit 2, one-line error")
    long = runner.invoke(app, ["query", HOSTILE_QUERIES["1 MB of text"][0], "--store", str(tiny_store), "--model",
                               str(model_dir), "--quiet"])
    assert "truncated" in long.stderr


def test_fuzz_manifest_reader_and_query_path(tiny_store: Path, tmp_path: Path, reliability) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from hsl.errors import HSLError
    from hsl_data.sources import read_source

    counts = {"manifest": 0, "query": 0}
    write_manifest(tmp_path, 2)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=400) | st.text(max_size=300).map(str.encode))
    def fuzz_manifest(body: bytes) -> None:
        path = tmp_path / "fuzz.csv"
        path.write_bytes(b"id,image,text,kind\n" + body)
        counts["manifest"] += 1
        try:
            listing = read_source(path)
        except HSLError:
            return
        for item in listing.items:
            assert item.id and item.text

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    save_model(create_model("hsl-tiny", 32, 24), model_dir, {"backbone": "tiny"})
    searcher = Searcher(tiny_store, model_dir)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.text(max_size=200))
    def fuzz_query(text: str) -> None:
        counts["query"] += 1
        try:
            result = searcher.search(text, top_k=5)
        except HSLError:
            return
        assert len(result.hits) == 5

    fuzz_manifest()
    fuzz_query()
    reliability(BAD_INPUTS, "fuzzed CSV manifests (hypothesis: random bytes and text)", counts["manifest"],
                "each read or refused with an hsl error; never a crash")
    reliability(BAD_INPUTS, "fuzzed query text (hypothesis: any unicode)", counts["query"],
                "each answered or refused with an hsl error; never a crash")
