"""The library's own error types: the CLI prints their message on one line and exits 1 (usage: 2).

The library knows nothing of the command line or the web API, so an error says what went wrong as
data: `parameter`, the library's name of the argument at fault ("top_k", "where", "store"), the
`value` it was given and, when short, what is `allowed`. Its message names parameters in backticks
(`top_k`), never as a flag; each front end words it with `worded(names)`, where `names` maps the
library's parameter names to its own (the CLI: "top_k" -> "--top-k"; the web API: "top_k" -> "k").
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_PARAMETER = re.compile(r"`([a-z][a-z0-9_.]*)`")  # a parameter as a message names it: `top_k`, `ivfpq.m`


class HSLError(Exception):
    """A runtime error with a message fit for the user: what went wrong, where, and what to do."""

    def __init__(self, message: str = "", parameter: str | None = None, value: Any = None,
                 allowed: Sequence[Any] | None = None) -> None:
        super().__init__(message)
        self.parameter, self.value = parameter, value
        self.allowed = list(allowed) if allowed is not None else None

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with each `parameter` in a front end's words (a name it lacks: without backticks)."""
        return _PARAMETER.sub(lambda match: names.get(match[1], match[1]), str(self))


class HSLUsageError(HSLError):
    """The user asked for something that cannot work as given (a missing column, a bad option)."""


class StoreMismatchError(HSLError):
    """A store, model or backbone that do not belong together."""


class StoreInUseError(HSLError):
    """Another live process is writing the store: nothing is wrong with it, it is only busy."""

    def __init__(self, store: str | os.PathLike, holder: dict | None) -> None:
        self.store, self.holder = store, holder
        if holder and holder.get("pid"):
            who = f"process {holder['pid']}" + (f" on {holder['host']}" if holder.get("host") else "")
            what = f" ({holder['command']})" if holder.get("command") else ""
            text = (f"{store} is in use: {who}{what} is writing it; wait for it to finish, or stop it "
                    f"(kill {holder['pid']}) and run this again: the store keeps what it finished")
        else:
            text = (f"{store} is in use by another hsl process that is writing it; wait for it to finish, "
                    "then run this again")
        super().__init__(text)


def os_error_message(exc: OSError, what: str = "") -> str:
    """One line for a file-system refusal: the path, the cause in words and what to do, never "[Errno 2]".

    `what` names the parameter the path came from (e.g. "`html`"), when the caller knows it."""
    path = exc.filename
    label = " ".join(str(p) for p in (what, os.fsdecode(path) if path is not None else None) if p)
    cause = exc.strerror or str(exc)
    if exc.errno == errno.ENOENT and path is not None:
        parent = Path(os.fsdecode(path)).parent
        if not parent.is_dir():
            fix = f"its folder {parent} does not exist; create it or give another path"
        else:
            fix = "no such file; check the path"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = "permission denied; give a path you are allowed to use"
    elif exc.errno == errno.ENOTDIR:
        fix = "a part of the path is a file, not a folder; give another path"
    elif exc.errno == errno.EISDIR:
        fix = "that is a folder; give a file path"
    elif exc.errno == errno.ENOSPC:
        fix = "no space left on the disk; free some space and run the command again"
    elif exc.errno == errno.EROFS:
        fix = "the file system is read-only; give a path on a writable disk"
    else:
        fix = cause[:1].lower() + cause[1:]
    return f"{label}: {fix}" if label else fix
