"""`hsl`: extract features from product photos, train HSL, search with words.

Each command parses its options, calls one library function and renders the result. Heavy
imports (torch, the backbones) happen inside the commands so `hsl --help` stays instant.
"""

from __future__ import annotations

from . import model_commands, search_commands, serve_commands, store_commands  # noqa: F401  (they register their commands)
from .app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
