"""A tree of planted differences between a primary and a target (Synchronize tests, issue 4 done-means 1 and 6)."""

from __future__ import annotations

import os
from pathlib import Path

# Phrases a verify must report for the tree plant_differences makes (one per planted difference).
PLANTED_PHRASES = [
    "d/content.bin: content differs", "grow.txt: content differs", "shrink.txt: content differs",
    "mode.txt: differs in mode", "same.txt: differs in mtime, xattrs", "only-primary: missing on the target",
    "only-target: extra on the target", "only-target.txt: extra", "was-dir: dir on the target",
    "was-file: file on the target", "sym: missing", "sym2: symlink target", "sym3: symlink on the target",
    "link-src: not a hard link of link-dst", "sep2: hard-linked on the target", "fifo: missing", "/: differs in mode",
]


def make_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)



def plant_differences(a: Path, b: Path) -> None:
    """Everything DoD 1 of issue 4 names: content, metadata, extra, missing, symlinks, hard links."""
    common = {"same.txt": b"same\n", "d/content.bin": os.urandom(20000), "d/e/deep.txt": b"deep",
              "mode.txt": b"m", "link-src": b"linked content", "empty": b""}
    make_tree(a, common)
    make_tree(b, common)
    # content differs in one block, and a size difference
    (b / "d/content.bin").write_bytes((a / "d/content.bin").read_bytes()[:8192] + b"X" * 4096
                                      + (a / "d/content.bin").read_bytes()[12288:])
    make_tree(a, {"grow.txt": b"a" * 10000})
    make_tree(b, {"grow.txt": b"a" * 3000})
    make_tree(a, {"shrink.txt": b"b" * 100})
    make_tree(b, {"shrink.txt": b"b" * 9000})
    # metadata
    os.chmod(a / "mode.txt", 0o600)
    os.chmod(b / "mode.txt", 0o644)
    os.setxattr(a / "same.txt", "user.k", b"v1")
    os.setxattr(b / "same.txt", "user.old", b"gone")
    os.utime(b / "same.txt", ns=(1, 1))
    # missing and extra, files and trees
    make_tree(a, {"only-primary/x/y.txt": b"new", "only-primary/z": b"zz"})
    make_tree(b, {"only-target/q/r.txt": b"old", "only-target.txt": b"extra"})
    # type changes both ways
    make_tree(a, {"was-dir": b"now a file"})
    make_tree(b, {"was-dir/inner": b"inner"})
    (a / "was-file").mkdir()
    make_tree(a, {"was-file/k": b"k"})
    make_tree(b, {"was-file": b"file"})
    # symlinks: missing, different target, replaced
    os.symlink("same.txt", a / "sym")
    os.symlink("d/e", a / "sym2")
    os.symlink("elsewhere", b / "sym2")
    os.symlink("x", b / "sym3")
    make_tree(a, {"sym3": b"regular"})
    # hard links: on the primary, not on the target; and the other way round
    os.link(a / "link-src", a / "link-dst")
    make_tree(b, {"link-dst": b"linked content"})
    make_tree(a, {"sep1": b"one", "sep2": b"one"})
    make_tree(b, {"sep1": b"one"})
    os.link(b / "sep1", b / "sep2")
    # a fifo missing
    os.mkfifo(a / "fifo")
    os.chmod(a, 0o751)


