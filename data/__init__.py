"""Dataset formats hsl reads: photo folders and CSV/JSONL manifests (KDD Cup 2020 TSV later)."""

from .sources import Rejected, SourceItem, SourceListing, read_source

__all__ = ["Rejected", "SourceItem", "SourceListing", "read_source"]
