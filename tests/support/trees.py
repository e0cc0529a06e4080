"""Tree comparison for tests: the package's own (octofs.tree), re-exported, plus exclusion-aware snapshots."""

from __future__ import annotations

from pathlib import Path

from octofs.exclude import ExcludeFilter
from octofs.tree import Entry, assert_trees_equal, diff_snapshots, tree_snapshot

__all__ = ["Entry", "assert_trees_equal", "diff_snapshots", "snapshot_minus_excluded", "tree_snapshot"]


def snapshot_minus_excluded(root: Path, patterns: list[str]) -> dict[bytes, Entry]:
    """``tree_snapshot(root, mtime=True)`` without excluded paths (nor their names in hard-link groups)."""
    f = ExcludeFilter(patterns)
    out = {}
    for rel, entry in tree_snapshot(root, mtime=True).items():
        if f.excluded(rel, entry.kind == "dir"):
            continue
        if entry.links is not None:
            links = tuple(p for p in entry.links if not f.excluded(p))
            entry = entry._replace(links=links if len(links) > 1 else None)
        out[rel] = entry
    return out
