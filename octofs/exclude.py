r"""exclude.py: owns the meaning of vault.yaml ``exclude``: which vault paths are not mirrored.

Invariants:
- Pure and synchronous: no I/O, no trio. ``ExcludeFilter.excluded`` answers from the
  path (and whether it names a directory) alone, so the same question always gets the
  same answer.
- Hereditary: if a directory is excluded, so is everything below it, whatever a
  later ``!`` pattern says (as in git: "it is not possible to re-include a file if a
  parent directory of that file is excluded").
- Free when unused: with no patterns, ``excluded`` returns False before looking at
  the path (fs/operations.py calls it on every journaled change).

Semantics (gitignore's, applied to vault-relative byte paths such as ``b"a/b/c"``):

- ``*`` matches any run of bytes except ``/``; ``?`` one byte except ``/``;
  ``[abc]``, ``[a-z]``, ``[!a-z]`` / ``[^a-z]`` and ``[[:alpha:]]``-style classes
  match one byte (never ``/``). ``\`` makes the next character literal (``\*``,
  ``\!``, ``\[``).
- A pattern with no ``/`` (other than a trailing one) matches a *name* at any depth:
  ``*.tmp`` excludes ``a.tmp`` and ``x/y/a.tmp``.
- A pattern with a ``/`` at its start or in its middle is anchored to the vault
  root: ``/build`` and ``logs/*.gz`` only match from the top.
- ``**`` as a whole component: ``**/x`` matches ``x`` at any depth; ``x/**`` matches
  everything *inside* ``x`` (but not ``x`` itself, so a ``pg_stat_tmp/**`` pattern
  keeps the directory on targets and drops its contents); ``a/**/b`` matches ``a/b``,
  ``a/1/b``, ``a/1/2/b``. Any other ``**`` is an ordinary ``*``.
- A trailing ``/`` restricts the pattern to directories: ``cache/`` excludes a
  directory called ``cache`` (and so its contents) but not a file of that name.
- A leading ``!`` negates: a path matched by it is included again. The last pattern
  that matches a path decides. Because exclusion is hereditary, ``!`` can re-include
  a path only if no directory above it is excluded: write ``build/*`` + ``!build/keep``,
  not ``build/`` + ``!build/keep``.
- Differences from a ``.gitignore`` file: each list item is one pattern, taken
  verbatim (no ``#`` comments, trailing spaces are part of the pattern). As in git,
  a malformed pattern (an unclosed ``[``, a lone ``\`` at the end) matches nothing,
  and so do an empty pattern, ``!`` alone and ``/`` alone; ``pattern_problem`` says
  which patterns those are, so that a config check can refuse them.
- The vault root itself is never excluded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ExcludeFilter", "pattern_problem"]

# Per-path answers kept by one filter, per kind (files, directories). When a cache is
# full it is emptied: a simple bound that costs one re-evaluation per path afterwards.
_CACHE_ENTRIES = 8192

_SPECIAL = frozenset(b"*?[\\")

# POSIX bracket-expression classes, as regex class bodies (C locale, as git's wildmatch).
_POSIX_CLASSES = {
    b"alnum": rb"0-9A-Za-z",
    b"alpha": rb"A-Za-z",
    b"blank": rb" \t",
    b"cntrl": rb"\x00-\x1f\x7f",
    b"digit": rb"0-9",
    b"graph": rb"!-~",
    b"lower": rb"a-z",
    b"print": rb" -~",
    b"punct": rb"!-/:-@\[-`{-~",
    b"space": rb" \t\n\r\x0b\x0c",
    b"upper": rb"A-Z",
    b"xdigit": rb"0-9A-Fa-f",
}


@dataclass(frozen=True, slots=True)
class _Rule:
    regex: re.Pattern[bytes]
    negate: bool
    dir_only: bool
    basename: bool  # match the last component only (a pattern without '/')
    # Anchored rules: the leading components without wildcards, and whether that is
    # the whole pattern. Used by ``location_dependent``.
    literal_prefix: tuple[bytes, ...]
    fully_literal: bool


class ExcludeFilter:
    """Decides which vault paths are excluded from mirroring (see the module docstring).

    Args:
        patterns: gitignore-style patterns (``str`` from vault.yaml, or ``bytes``), in
            order; later patterns override earlier ones.

    Attributes:
        patterns: the patterns as given, as bytes.
    """

    __slots__ = ("patterns", "_rules", "_anchored", "_file_cache", "_dir_cache")

    def __init__(self, patterns: Sequence[str | bytes] = ()) -> None:
        self.patterns: tuple[bytes, ...] = tuple(os.fsencode(p) for p in patterns)
        rules = (_compile(p) for p in self.patterns)
        self._rules: tuple[_Rule, ...] = tuple(r for r in rules if r is not None)
        self._anchored: tuple[_Rule, ...] = tuple(r for r in self._rules if not r.basename)
        self._file_cache: dict[bytes, bool] = {}
        self._dir_cache: dict[bytes, bool] = {}

    def __bool__(self) -> bool:
        """True if any pattern can exclude anything."""
        return bool(self._rules)

    def excluded(self, path: bytes, is_dir: bool = False) -> bool:
        """Is ``path`` (vault-relative, no leading ``/``; ``b""`` is the root) excluded?

        Args:
            path: the path.
            is_dir: whether it names a directory (for patterns ending in ``/``).

        Returns:
            True if the path, or a directory above it, is excluded.
        """
        if not self._rules or not path:
            return False
        cache = self._dir_cache if is_dir else self._file_cache
        hit = cache.get(path)
        if hit is not None:
            return hit
        slash = path.rfind(b"/")
        result = (slash > 0 and self._dir_excluded(path[:slash])) or self._match(path, is_dir)
        _store(cache, path, result)
        return result

    def location_dependent(self, path: bytes) -> bool:
        """Could moving directory ``path`` change whether something *below* it is excluded?

        False means: for every ``x``, ``path/x`` and ``elsewhere/x`` are excluded alike
        (given that neither directory is itself excluded). That holds for patterns
        that look at names only; an anchored pattern (``/a/*.log``, ``pg_stat_tmp/**``)
        makes it True when its fixed leading components and ``path`` lie on one line.
        Conservative: True may be answered where nothing actually changes.
        """
        if not self._anchored:
            return False
        parts = tuple(path.split(b"/")) if path else ()
        for rule in self._anchored:
            prefix = rule.literal_prefix
            if rule.fully_literal and len(prefix) <= len(parts):
                continue  # matches exactly one path, at or above ``path``
            k = min(len(prefix), len(parts))
            if prefix[:k] == parts[:k]:
                return True
        return False

    # -- internals -------------------------------------------------------------

    def _dir_excluded(self, path: bytes) -> bool:
        """``excluded(path, is_dir=True)``, iteratively (paths may have ~2000 components)."""
        cache = self._dir_cache
        pending = []
        result = False
        p = path
        while True:
            hit = cache.get(p)
            if hit is not None:
                result = hit
                break
            pending.append(p)
            slash = p.rfind(b"/")
            if slash <= 0:
                break
            p = p[:slash]
        for p in reversed(pending):
            result = result or self._match(p, True)
            _store(cache, p, result)
        return result

    def _match(self, path: bytes, is_dir: bool) -> bool:
        """Does the last rule that matches ``path`` itself exclude it (ancestors not considered)?"""
        name = path[path.rfind(b"/") + 1:]
        for rule in reversed(self._rules):
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.fullmatch(name if rule.basename else path):
                return not rule.negate
        return False


def pattern_problem(pattern: str | bytes) -> str | None:
    """Why ``pattern`` can never match anything, or None if it is usable (for config checks)."""
    raw = os.fsencode(pattern)
    if b"\0" in raw:
        return "contains a NUL byte"
    if _compile(raw) is None:
        return "matches nothing (empty, '!' or '/' alone, an unclosed '[', or a lone backslash at the end)"
    return None


def _store(cache: dict[bytes, bool], path: bytes, result: bool) -> None:
    if len(cache) >= _CACHE_ENTRIES:
        cache.clear()
    cache[path] = result


# -- compiling a pattern ------------------------------------------------------------


def _compile(pattern: bytes) -> _Rule | None:
    """The rule for one pattern, or None if it can match nothing."""
    negate = pattern.startswith(b"!")
    if negate:
        pattern = pattern[1:]
    dir_only = pattern.endswith(b"/") and not _escaped_at(pattern, len(pattern) - 1)
    if dir_only:
        pattern = pattern[:-1]
    anchored = b"/" in pattern
    if pattern.startswith(b"/"):
        pattern = pattern[1:]
    if not pattern or b"\0" in pattern:
        return None
    if not anchored:
        body = _translate_component(pattern)
        if body is None:
            return None
        return _Rule(re.compile(body, re.DOTALL), negate, dir_only, True, (), False)

    parts: list[bytes] = []
    for part in pattern.split(b"/"):
        if part == b"**" and parts and parts[-1] == b"**":
            continue  # "**/**" is "**"
        parts.append(part)
    out: list[bytes] = []
    need_sep = False
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if part == b"**" and last > 0:
            if i == 0:
                out.append(b"(?:.*/)?")  # zero or more leading directories
            elif i == last:
                out.append(b"/.+")  # everything inside, not the directory itself
            else:
                out.append(b"/(?:.*/)?")  # zero or more directories in between
            need_sep = False
            continue
        body = _translate_component(part)
        if body is None:
            return None
        if need_sep:
            out.append(b"/")
        out.append(body)
        need_sep = True
    literal: list[bytes] = []
    for part in parts:
        if _SPECIAL.intersection(part):
            break
        literal.append(part)
    return _Rule(re.compile(b"".join(out), re.DOTALL), negate, dir_only, False,
                 tuple(literal), len(literal) == len(parts))


def _escaped_at(pattern: bytes, index: int) -> bool:
    """Is the byte at ``index`` preceded by an odd number of backslashes?"""
    n = 0
    while index - n - 1 >= 0 and pattern[index - n - 1] == 0x5C:
        n += 1
    return n % 2 == 1


def _byte_re(b: int) -> bytes:
    return b"\\x%02x" % b


def _translate_component(part: bytes) -> bytes | None:
    """A regex for one path component of a glob, or None if the glob is malformed
    (a trailing lone backslash, a ``[`` without ``]``)."""
    out: list[bytes] = []
    i, n = 0, len(part)
    while i < n:
        c = part[i]
        if c == 0x2A:  # '*' (and '**' inside a component: also just '*')
            while i < n and part[i] == 0x2A:
                i += 1
            out.append(b"[^/]*")
            continue
        if c == 0x3F:  # '?'
            out.append(b"[^/]")
        elif c == 0x5C:  # '\'
            if i + 1 >= n:
                return None
            i += 1
            out.append(re.escape(part[i:i + 1]))
        elif c == 0x5B:  # '['
            parsed = _translate_class(part, i)
            if parsed is None:
                return None  # no closing ']': git's wildmatch gives up, so the pattern matches nothing
            regex, i = parsed
            out.append(regex)
            continue
        else:
            out.append(re.escape(part[i:i + 1]))
        i += 1
    return b"".join(out)


def _translate_class(part: bytes, start: int) -> tuple[bytes, int] | None:
    """Translate the bracket expression at ``part[start] == '['``: (regex, index after ']') or None."""
    i, n = start + 1, len(part)
    negate = i < n and part[i] in b"!^"
    if negate:
        i += 1
    items: list[bytes] = []
    first = True
    while i < n:
        c = part[i]
        if c == 0x5D and not first:  # ']' closes, except as the first member
            break
        first = False
        if c == 0x5B and part[i + 1:i + 2] == b":":  # [:class:]
            end = part.find(b":]", i + 2)
            if end >= 0 and part[i + 2:end] in _POSIX_CLASSES:
                items.append(_POSIX_CLASSES[part[i + 2:end]])
                i = end + 2
                continue
        if c == 0x5C and i + 1 < n:
            i += 1
            c = part[i]
        lo = c
        i += 1
        if i + 1 < n and part[i] == 0x2D and part[i + 1] != 0x5D:  # a range lo-hi
            hi = part[i + 1]
            i += 2
            if hi == 0x5C and i < n:
                hi = part[i]
                i += 1
            if lo <= hi:
                items.append(_byte_re(lo) + b"-" + _byte_re(hi))
            # else: an empty range, which matches nothing (as in git)
        else:
            items.append(_byte_re(lo))
    else:
        return None  # no closing ']'
    body = b"".join(items)
    if negate:
        return b"[^/" + body + b"]", i + 1
    if not body:
        return b"(?!)", i + 1
    return b"(?!/)[" + body + b"]", i + 1
