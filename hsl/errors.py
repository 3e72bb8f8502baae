"""The library's own error types: the CLI prints their message on one line and exits 1 (usage: 2)."""

from __future__ import annotations

import os


class HSLError(Exception):
    """A runtime error with a message fit for the user: what went wrong, where, and what to do."""


class HSLUsageError(HSLError):
    """The user asked for something that cannot work as given (a missing column, a bad option)."""


class StoreMismatchError(HSLError):
    """A store, model or backbone that do not belong together."""


class StoreInUseError(HSLError):
    """Another live process is writing the store: nothing is wrong with it, it is only busy."""

    def __init__(self, store: str | os.PathLike, holder: dict | None, problem: str = "") -> None:
        self.store, self.holder = store, holder
        if problem:
            text = f"{store}: cannot take the writer's lock: {problem}; check the folder's permissions"
        elif holder and holder.get("pid"):
            who = f"process {holder['pid']}" + (f" on {holder['host']}" if holder.get("host") else "")
            what = f" ({holder['command']})" if holder.get("command") else ""
            text = (f"{store} is in use: {who}{what} is writing it; wait for it to finish, or stop it "
                    f"(kill {holder['pid']}) and run this again: the store keeps what it finished")
        else:
            text = (f"{store} is in use by another hsl process that is writing it; wait for it to finish, "
                    "then run this again")
        super().__init__(text)
