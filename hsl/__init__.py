"""hsl: find product photos from a shopper's words with Hierarchical Similarity Learning.

The public API is imported lazily so that `import hsl` (and the CLI's help) stays fast. The functions
that share their module's name are imported from the module: `from hsl.train import train`,
`from hsl.evaluate import evaluate` (once a submodule is imported, `hsl.NAME` is the module).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "HSLError": "errors",
    "HSLUsageError": "errors",
    "StoreMismatchError": "errors",
    "FeatureStore": "store",
    "create_backbone": "backbones",
    "extract": "extract",
    "ExtractOptions": "extract",
    "ExtractReport": "extract",
    "TrainOptions": "train",
    "Trainer": "train",
    "Searcher": "search",
    "SearchResult": "search",
}

if TYPE_CHECKING:  # pragma: no cover
    from .backbones import create_backbone  # noqa: F401
    from .errors import HSLError, HSLUsageError, StoreMismatchError  # noqa: F401
    from .extract import ExtractOptions, ExtractReport, extract  # noqa: F401
    from .search import Searcher, SearchResult  # noqa: F401
    from .store import FeatureStore  # noqa: F401
    from .train import Trainer, TrainOptions  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hsl' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = sorted(_EXPORTS) + ["__version__"]
