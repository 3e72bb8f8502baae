"""One writer per store: `STORE.lock` beside the store, held with a POSIX record lock while a command
writes it (`hsl extract`, `hsl merge`).

A POSIX lock (fcntl) belongs to the process that took it: a forked child does not inherit it, and
the kernel drops it the moment that process dies, `kill -9` included. So a killed writer never
leaves the store locked, and a second writer sees the first one's process id and is refused at
once, before it reads or changes anything. Readers (queries, `hsl index`, training) take no lock:
they read a consistent store by construction (hsl/store.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import HSLError, StoreInUseError, os_error_message

_HELD: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth): this process may nest its own lock


def lock_path(store_path: str | os.PathLike) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".lock")


@contextmanager
def writing(store_path: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold the store's writer lock for the block; StoreInUseError when another live process holds it."""
    path = lock_path(store_path)
    key = str(path.absolute())
    if key in _HELD:  # POSIX locks are per process: a second fd's close would drop the first's lock
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
    else:
        _HELD[key] = (_acquire(path, Path(store_path), command), 1)
    try:
        yield
    finally:
        fd, depth = _HELD[key]
        if depth > 1:
            _HELD[key] = (fd, depth - 1)
        else:
            del _HELD[key]
            path.unlink(missing_ok=True)  # while still locked: nobody can be between open and lock on it
            os.close(fd)


def _acquire(path: Path, store_path: Path, command: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # the store's folder is missing, a file, read-only, ...: say so for the store
            raise HSLError(os_error_message(OSError(exc.errno, exc.strerror, str(store_path)))) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd) if exc.errno in (errno.EACCES, errno.EAGAIN) else None
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):  # held by a live process
                raise StoreInUseError(store_path, holder) from None
            raise HSLError(f"{store_path}: its file system cannot lock {path.name} ({exc.strerror}); "
                           "put the store on a file system with POSIX locks (a local disk, NFSv4)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the previous holder removed this file as we opened it: take the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                              "argv": sys.argv[1:4]}).encode(), 0)
    return fd


def _read_holder(fd: int) -> dict | None:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None  # the holder is between taking the lock and writing its name
    if isinstance(holder, dict) and holder.get("host") == socket.gethostname():
        holder.pop("host")  # name the machine only when it is another one (a shared file system)
    return holder if isinstance(holder, dict) else None
