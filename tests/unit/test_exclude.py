"""ExcludeFilter: gitignore-style matching of vault-relative byte paths (octofs/exclude.py).

The expectations for ASCII paths were checked against ``git check-ignore --no-index``.
"""

from __future__ import annotations

import pytest

from octofs import exclude as exclude_mod
from octofs.exclude import ExcludeFilter, pattern_problem

F, D = False, True  # is_dir

# (patterns, path, is_dir, excluded?)
CASES = [
    # no patterns: nothing is excluded
    ([], b"a", F, False),
    ([], b"a/b.tmp", F, False),
    # '*' and '?' never cross '/'; a pattern without '/' matches a name at any depth
    (["*.tmp"], b"doc.tmp", F, True),
    (["*.tmp"], b"a/b/doc.tmp", F, True),
    (["*.tmp"], b"doc.tmp.txt", F, False),
    (["*.tmp"], b"doc.txt", F, False),
    (["*.tmp"], b"tmp", F, False),
    (["*.tmp"], b".tmp", F, True),
    (["doc.?"], b"doc.c", F, True),
    (["doc.?"], b"doc.cc", F, False),
    (["a*b"], b"a/b", F, False),
    (["a?b"], b"a/b", F, False),
    # bracket expressions
    (["[ab]x"], b"ax", F, True),
    (["[ab]x"], b"cx", F, False),
    (["[a-c]x"], b"bx", F, True),
    (["[!a-c]x"], b"bx", F, False),
    (["[!a-c]x"], b"dx", F, True),
    (["[^a-c]x"], b"dx", F, True),
    (["[]]x"], b"]x", F, True),
    (["[[:digit:]]*"], b"7up", F, True),
    (["[[:digit:]]*"], b"up7", F, False),
    (["[[:upper:][:digit:]]"], b"Q", F, True),
    (["x[/]y"], b"x/y", F, False),
    (["x[!a]y"], b"x/y", F, False),
    (["[ab"], b"[ab", F, False),  # no closing ']': matches nothing (as git)
    (["\\[ab"], b"[ab", F, True),
    (["[z-a]"], b"m", F, False),  # an empty range matches nothing
    # backslash escapes
    (["\\*"], b"*", F, True),
    (["\\*"], b"x", F, False),
    (["\\!keep"], b"!keep", F, True),
    (["a\\?"], b"ab", F, False),
    # a leading '/' or a '/' in the middle anchors to the vault root
    (["/build"], b"build", F, True),
    (["/build"], b"src/build", F, False),
    (["logs/*.gz"], b"logs/x.gz", F, True),
    (["logs/*.gz"], b"a/logs/x.gz", F, False),
    (["logs/*.gz"], b"logs/sub/x.gz", F, False),
    (["build"], b"src/build", F, True),
    # trailing '/': directories only
    (["cache/"], b"cache", D, True),
    (["cache/"], b"cache", F, False),
    (["cache/"], b"a/cache", D, True),
    (["cache/"], b"cache/x", F, True),  # below an excluded directory
    (["/cache/"], b"a/cache", D, False),
    # '**'
    (["**/foo"], b"foo", F, True),
    (["**/foo"], b"a/b/foo", F, True),
    (["**/foo/bar"], b"x/foo/bar", F, True),
    (["**/foo/bar"], b"foo/bar", F, True),
    (["**/foo/bar"], b"foo/x/bar", F, False),
    (["pg_stat_tmp/**"], b"pg_stat_tmp", D, False),  # the directory itself stays
    (["pg_stat_tmp/**"], b"pg_stat_tmp/global.stat", F, True),
    (["pg_stat_tmp/**"], b"pg_stat_tmp/a/b", F, True),
    (["pg_stat_tmp/**"], b"x/pg_stat_tmp/a", F, False),  # anchored
    (["a/**/b"], b"a/b", F, True),
    (["a/**/b"], b"a/x/b", F, True),
    (["a/**/b"], b"a/x/y/b", F, True),
    (["a/**/b"], b"a/xb", F, False),
    (["a/**/**/b"], b"a/b", F, True),
    (["a**b"], b"axxb", F, True),  # not a whole component: an ordinary '*'
    (["a**b"], b"ax/xb", F, False),
    (["**"], b"anything/at/all", F, True),
    # anything below an excluded directory is excluded
    (["tmp"], b"tmp/a/b/c", F, True),
    (["tmp"], b"tmp/a", D, True),
    (["*.d"], b"x.d/y/z.txt", F, True),
    # negation: the last matching pattern wins
    (["*.tmp", "!keep.tmp"], b"keep.tmp", F, False),
    (["*.tmp", "!keep.tmp"], b"other.tmp", F, True),
    (["!keep.tmp", "*.tmp"], b"keep.tmp", F, True),
    (["build/*", "!build/keep"], b"build/keep", F, False),
    (["build/*", "!build/keep"], b"build/drop", F, True),
    (["build/*", "!build/keep"], b"build/keep/inner", F, False),
    # ... but it cannot re-include below an excluded directory (as in git)
    (["build/", "!build/keep"], b"build/keep", F, True),
    (["build", "!build/keep"], b"build/keep", F, True),
    (["*.log", "!important/*.log"], b"important/a.log", F, False),
    (["*.log", "!important/*.log"], b"other/a.log", F, True),
    # a negated directory-only pattern
    (["x*", "!xdir/"], b"xdir", D, False),
    (["x*", "!xdir/"], b"xdir", F, True),
    # the root is never excluded; degenerate patterns match nothing
    (["**"], b"", D, False),
    ([""], b"a", F, False),
    (["!"], b"a", F, False),
    (["/"], b"a", D, False),
    (["a\\"], b"a", F, False),
    (["a\\"], b"a\\", F, False),
    # names are bytes, not necessarily UTF-8; '*' and '?' match any byte but '/'
    (["*.tmp"], b"\xff\xfe.tmp", F, True),
    (["?"], b"\xff", F, True),
    (["a*"], b"a\nb", F, True),
    (["caf\xe9"], b"caf\xc3\xa9", F, True),  # str patterns are fsencoded (UTF-8 here)
]


@pytest.mark.parametrize(("patterns", "path", "is_dir", "expected"), CASES,
                         ids=[f"{p}-{path!r}-{'dir' if d else 'file'}" for p, path, d, _ in CASES])
def test_excluded(patterns, path, is_dir, expected):
    f = ExcludeFilter(patterns)
    assert f.excluded(path, is_dir) is expected
    assert f.excluded(path, is_dir) is expected  # the cached answer is the same


@pytest.mark.parametrize(("patterns", "path", "is_dir", "expected"), CASES[:20])
def test_bytes_patterns_same_as_str(patterns, path, is_dir, expected):
    f = ExcludeFilter([p.encode() for p in patterns])
    assert f.excluded(path, is_dir) is expected


def test_parent_checked_as_directory():
    # "cache/" is dir-only: "cache/x" is below a directory named cache, so excluded,
    # although "cache" asked about as a file is not.
    f = ExcludeFilter(["cache/"])
    assert f.excluded(b"cache/x")
    assert not f.excluded(b"cache")


def test_no_patterns_is_falsy_and_cheap():
    f = ExcludeFilter([])
    assert not f
    assert not f.excluded(b"a/b/c")
    assert not f._file_cache and not f._dir_cache  # nothing computed, nothing cached
    assert not f.location_dependent(b"a")
    assert ExcludeFilter(["*.tmp"])
    assert not ExcludeFilter(["", "!"])  # only degenerate patterns


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(exclude_mod, "_CACHE_ENTRIES", 16)
    f = ExcludeFilter(["*.tmp"])
    for i in range(100):
        assert f.excluded(b"d%d/f%d.tmp" % (i, i))
        assert not f.excluded(b"d%d/f%d.txt" % (i, i))
    assert len(f._file_cache) <= 16 and len(f._dir_cache) <= 16


def test_deep_path_no_recursion():
    f = ExcludeFilter(["deep/"])
    path = b"/".join([b"a"] * 3000) + b"/deep/x"
    assert f.excluded(path)
    assert not f.excluded(b"/".join([b"a"] * 3000))


@pytest.mark.parametrize(("patterns", "path", "expected"), [
    (["*.tmp", "cache/", "!keep"], b"a/b", False),  # names only: never
    (["pg_stat_tmp/**"], b"pg_stat_tmp", True),
    (["pg_stat_tmp/**"], b"other", False),
    (["pg_stat_tmp/**"], b"pg_stat_tmp/x", True),
    (["/a/b/*.log"], b"a", True),
    (["/a/b/*.log"], b"a/b", True),
    (["/a/b/*.log"], b"a/c", False),
    (["/a/b"], b"a", True),  # a literal anchored pattern: "a/b" is below "a"
    (["/a/b"], b"a/b", False),  # ... but nothing below "a/b" can match it
    (["*/x"], b"anything", True),  # a wildcard in the first component
    (["**/foo/bar"], b"q", True),
])
def test_location_dependent(patterns, path, expected):
    assert ExcludeFilter(patterns).location_dependent(path) is expected


def test_patterns_kept_as_bytes():
    assert ExcludeFilter(["*.tmp", b"x"]).patterns == (b"*.tmp", b"x")


@pytest.mark.parametrize(("pattern", "ok"), [
    ("*.tmp", True), ("!keep", True), ("/a/", True), ("", False), ("!", False), ("/", False),
    ("a\\", False), ("a\0b", False), ("[ab", False), ("\\[ab", True),
])
def test_pattern_problem(pattern, ok):
    assert (pattern_problem(pattern) is None) is ok
