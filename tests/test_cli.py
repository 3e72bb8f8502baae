"""The `hsl` command line: exit codes, --json, --errors, --strict, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from hsl.errors import HSLError, HSLUsageError
from hsl_cli.main import app
from hsl_cli.options import FLAGS

from .conftest import write_manifest
from .test_architecture import ROOT, error_strings

runner = CliRunner()


def _extract(args: list[str]) -> object:
    return runner.invoke(app, ["extract", *args, "--backbone", "tiny", "--workers", "0", "--quiet"])


def test_extract_then_info_json(photo_folder: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    result = _extract([str(photo_folder), "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["extracted"] == 12 and summary["skipped"] == 0
    info = runner.invoke(app, ["info", str(store), "--json"])
    facts = json.loads(info.stdout)
    assert facts["count"] == 12 and facts["backbone"] == "tiny" and facts["file_bytes"] > 0


def test_skipped_items_exit_zero_or_one_with_strict(tmp_path: Path) -> None:
    extra = [{"id": "gone", "image": "images/gone.jpg", "text": "a missing photo", "colour": "", "kind": ""}]
    manifest = write_manifest(tmp_path / "shop", 3, extra)
    errors = tmp_path / "errors.jsonl"
    result = _extract([str(manifest), "--store", str(tmp_path / "a.h5"), "--errors", str(errors)])
    assert result.exit_code == 0
    assert "1 skipped" in result.stdout and "missing_file" in result.stdout
    line = json.loads(errors.read_text())
    assert line["id"] == "gone" and line["reason"] == "missing_file"
    strict = _extract([str(manifest), "--store", str(tmp_path / "b.h5"), "--strict"])
    assert strict.exit_code == 1


def test_missing_column_exits_2_with_one_line(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "shop", 2)
    result = _extract([str(manifest), "--store", str(tmp_path / "s.h5"), "--text-column", "title"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no column 'title'" in lines[0] and "--text-column" in lines[0]


def test_runtime_errors_exit_1(photo_folder: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path / "absent.h5")])
    assert result.exit_code == 1 and "no such store" in result.stderr
    (tmp_path / "junk.h5").write_text("not hdf5")
    result = runner.invoke(app, ["info", str(tmp_path / "junk.h5")])
    assert result.exit_code == 1 and "not an HDF5 file" in result.stderr and "re-create" not in result.stderr
    store = tmp_path / "s.h5"
    assert _extract([str(photo_folder), "--store", str(store)]).exit_code == 0
    other = runner.invoke(app, ["extract", str(photo_folder), "--store", str(store), "--backbone",
                                "openclip:hsl-tiny-vit", "--quiet"])
    assert other.exit_code == 1 and "holds backbone 'tiny'" in other.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert runner.invoke(app, ["extract"]).exit_code == 2
    result = _extract([str(tmp_path / "nowhere"), "--store", str(tmp_path / "s.h5")])
    assert result.exit_code == 2 and "no such folder or manifest" in result.stderr


def test_every_parameter_a_library_error_names_has_a_flag() -> None:
    """The library names parameters in backticks (hsl/errors.py); the CLI's one table words each as its flag."""
    named = {name for path in (ROOT / "hsl").glob("*.py") for _, text in error_strings(path)
             for name in re.findall(r"`([a-z][a-z0-9_.]*)`", text)}
    assert named and not named - set(FLAGS), f"parameters without a flag: {sorted(named - set(FLAGS))}"
    error = HSLUsageError("`ivfpq.m` 5 must divide 16; or leave out `ivfpq` and `hsl train`", "ivfpq.m", 5, [1, 2])
    assert error.worded(FLAGS) == "--pq-m 5 must divide 16; or leave out ivfpq and `hsl train`"
    assert (error.parameter, error.value, error.allowed) == ("ivfpq.m", 5, [1, 2])
    assert str(HSLError("plain")) == "plain" and HSLError("plain").parameter is None


def test_library_errors_are_worded_with_flags(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path / "absent.h5")])
    assert result.exit_code == 1 and f"create it with hsl extract SOURCE and --store {tmp_path}" in result.stderr
    (tmp_path / "taken").write_text("")
    result = runner.invoke(app, ["train", "--store", str(tmp_path / "s.h5"), "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 2
    assert "is not empty; give another --out, or --resume to continue its training" in result.stderr
    assert "`" not in result.stderr
