"""Helper processes that cannot outlive the command that started them.

A photo-decoding worker forked by `hsl extract` must not survive a `kill -9` of its parent: an
orphan asleep on a full queue keeps running for minutes, holding whatever it inherited. On Linux
the kernel kills it with its parent (PR_SET_PDEATHSIG); elsewhere a watcher thread notices the
new parent within a second and ends the process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Call first thing in a child process of `parent_pid`: the child ends when that parent dies."""
    if not (sys.platform.startswith("linux") and _linux_parent_death_signal()):
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="hsl-parent-watch").start()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _linux_parent_death_signal() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no prctl in this libc (musl builds, sandboxes): use the watcher
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)
