"""Dataset formats hsl reads: photo folders and CSV/JSONL manifests (sources.py), KDD Cup 2020 TSV (kdd.py)."""

from .sources import Rejected, SourceItem, SourceListing, read_source

__all__ = ["Rejected", "SourceItem", "SourceListing", "read_source"]
