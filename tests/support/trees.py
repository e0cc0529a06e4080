"""Tree comparison for tests: the package's own (octofs.tree), re-exported."""

from octofs.tree import Entry, assert_trees_equal, diff_snapshots, tree_snapshot

__all__ = ["Entry", "assert_trees_equal", "diff_snapshots", "tree_snapshot"]
