"""The library's own error types: the CLI prints their message on one line and exits 1 (usage: 2)."""


class HSLError(Exception):
    """A runtime error with a message fit for the user: what went wrong, where, and what to do."""


class HSLUsageError(HSLError):
    """The user asked for something that cannot work as given (a missing column, a bad option)."""


class StoreMismatchError(HSLError):
    """A store, model or backbone that do not belong together."""
