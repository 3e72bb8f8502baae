"""The `hsl` command line: exit codes, --json, --errors, --strict, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from hsl_cli.main import app

from .conftest import write_manifest

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
