"""Atomic file writes: the new content goes to a temporary sibling, which then replaces the file in
one rename, so a reader or a crash sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """`NAME.tmp` beside `path`: on the same file system, so the rename is atomic."""
    return path.with_name(path.name + ".tmp")


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills the temporary sibling; then it replaces `path`."""
    tmp = temporary_sibling(path)
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
