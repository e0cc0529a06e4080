"""config.py: owns vault.yaml and SERVE.yaml: parsing, validation, defaults, frozen config objects.

Invariants:
- This is the only module that imports ``yaml``. Lower layers never see a config
  object; ``cli`` and ``daemon`` hand them plain values (STYLE.md §2).
- Every mistake in a file raises one ``ConfigError`` subclass whose message is a
  single line naming the file (as the user spelled it), the line number and the
  key path, e.g. ``vault.yaml:7: targets[0].address: expected HOST:PORT, got
  'foo:bar'``. A bad command-line value raises ``UsageError`` naming the flag.
  Nothing here prints, logs or exits.
- A returned config is complete and checked: every default is filled in, every
  path is absolute, the backing dir exists, and the backing dir, the state dir
  and the mountpoint (when given) do not contain one another.
- Relative paths in a file are relative to the directory holding that file;
  ``~`` is expanded. Relative paths on the command line are relative to the
  current directory.
- ``null`` (or an empty value) for an optional key means "use the default".

docs/VAULT_YAML.md documents every key; keep it in step with the tables here.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import NoReturn

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from octofs.errors import (
    ConfigFileError,
    ConfigSyntaxError,
    ConfigValueError,
    UsageError,
)
from octofs.tlsconf import TlsSettings, normalize_fingerprint

DEFAULT_PORT = 7070
DEFAULT_LISTEN_HOST = "0.0.0.0"
DEFAULT_SYNC_TIMEOUT_S = 5.0
DEFAULT_JOURNAL_MAX_SIZE = 8 * 1024**3
DEFAULT_HEARTBEAT_S = 15.0
DEFAULT_METRICS_PORT = 9108  # the Prometheus exporter port most often left free for such daemons
DEFAULT_HEALTH_PORT = 7071  # the UDP health responder (docs/FORMAT.md §11)
DEFAULT_HOOK_TIMEOUT_S = 60.0
STATE_DIR_SUFFIX = ".octofs"

MODES = ("async", "sync")
ON_TIMEOUT = ("degrade", "block")
COMPRESS = ("none", "auto", "zstd")
WHEN_FULL = ("block", "resync")

# A vault or target name becomes a folder name on the target, so it is kept to a
# portable set and may not start with '.', '-' or '_' (no '.', '..', hidden or
# option-like names).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_NAME_RULE = "expected 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
_HOST_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")


# -- config objects -----------------------------------------------------------


@dataclass(frozen=True)
class TargetConfig:
    """One entry of ``targets:`` in vault.yaml.

    Attributes:
        name: unique within the vault; used by ``status`` and ``sync --target``.
        host: host name or IP address, IPv6 without brackets.
        port: TCP port, 1-65535.
        mode: ``"async"`` or ``"sync"`` (an fsync waits for this target's ack).
        sync_timeout_s: sync mode only: how long an fsync waits for the ack.
        on_timeout: ``"degrade"`` (to async, and say so) or ``"block"``.
        compress: ``"none"``, ``"auto"`` or ``"zstd"``.
        bandwidth_bps: bytes per second, 0 = unlimited.
        tls: TLS settings (``tls:``), or None for plain TCP.
    """

    name: str
    host: str
    port: int
    mode: str
    sync_timeout_s: float
    on_timeout: str
    compress: str
    bandwidth_bps: int
    tls: TlsSettings | None = None


@dataclass(frozen=True)
class JournalConfig:
    """``journal:`` in vault.yaml.

    Attributes:
        max_size_bytes: the journal may hold at most this many bytes of ops.
        when_full: ``"block"`` (writers wait; nothing lost) or ``"resync"``
            (drop the backlog and mark the lagging targets for resync).
    """

    max_size_bytes: int
    when_full: str


@dataclass(frozen=True)
class VaultConfig:
    """A checked vault.yaml.

    Attributes:
        path: the vault.yaml file, absolute (not symlink-resolved).
        vault: the vault name.
        backing: the backing dir, resolved (symlinks followed) and absolute.
        state_dir: journal and state, resolved and absolute; may not exist yet.
        exclude: gitignore-style patterns, relative to the vault root.
        forwarding: whether ops stream to targets as they happen (the saved
            state from ``octofs forward`` overrides this at run time).
        secret_file: shared secret for mutual authentication, or None.
        journal: the journal limits.
        targets: the targets, in file order; may be empty.
        heartbeat_s: ``failover.heartbeat``, seconds between heartbeats.
        allow_other: mount with FUSE ``allow_other``.
        metrics: ``(host, port)`` of the Prometheus endpoint, or None (off).
        health: ``failover.health``: ``(host, port)`` of the UDP health responder the
            mount daemon runs (what a target's direct query asks), or None (off).
    """

    path: Path
    vault: str
    backing: Path
    state_dir: Path
    exclude: tuple[str, ...]
    forwarding: bool
    secret_file: Path | None
    journal: JournalConfig
    targets: tuple[TargetConfig, ...]
    heartbeat_s: float
    allow_other: bool
    metrics: tuple[str, int] | None = None
    health: tuple[str, int] | None = None


@dataclass(frozen=True)
class FailoverConfig:
    """One entry of ``failover:`` in SERVE.yaml: how this target watches a vault's primary and takes over.

    Attributes:
        vault: the vault name.
        heartbeat_s: the primary's heartbeat interval; silence for longer starts the direct query.
        primary: ``(host, port)`` of the primary's health responder (vault.yaml ``failover.health``).
        witness: ``(host, port)`` of a witness's health responder (another ``octofs serve``), or None.
        mount: where the vault is mounted on takeover (must exist and be empty then).
        hooks: shell commands run in order after the takeover mount.
        hook_timeout_s: how long one hook may run.
        health: ``(host, port)`` for the new primary's health responder after takeover, or None.
        targets: ``(name, host, port)`` targets of the new primary (e.g. the old primary's
            ``octofs serve``, for failback).
    """

    vault: str
    heartbeat_s: float
    primary: tuple[str, int]
    witness: tuple[str, int] | None
    mount: Path
    hooks: tuple[str, ...]
    hook_timeout_s: float
    health: tuple[str, int] | None = None
    targets: tuple[tuple[str, str, int], ...] = ()


@dataclass(frozen=True)
class ServeConfig:
    """A checked SERVE.yaml merged with the ``octofs serve`` flags.

    Attributes:
        root: the folder holding one sub-folder per received vault; resolved.
        listen_host: address to listen on (IPv6 without brackets).
        listen_port: port to listen on; 0 = any free port.
        secret_file: shared secret for mutual authentication, or None.
        discovery: whether to answer ``octofs discover`` on the local network.
        takeover_hooks: commands to run, in order, when this target takes over.
        path: the SERVE.yaml file, absolute, or None when there was none.
        name: the name ``octofs discover`` shows, or None for the host name.
        metrics: ``(host, port)`` of the Prometheus endpoint, or None (off).
        health: ``(host, port)`` of the UDP health responder (answers witness queries), or None.
        failover: one entry per vault this target may take over.
        tls: TLS settings (``tls:``): then only TLS connections are accepted; None for plain TCP.
    """

    root: Path
    listen_host: str
    listen_port: int
    secret_file: Path | None
    discovery: bool
    takeover_hooks: tuple[str, ...]
    path: Path | None
    name: str | None = None
    metrics: tuple[str, int] | None = None
    health: tuple[str, int] | None = None
    failover: tuple[FailoverConfig, ...] = ()
    tls: TlsSettings | None = None


# -- sizes and durations ------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
# ASCII digits only; bounded (every float still fits) so Fraction stays cheap.
_NUMBER = r"(?:[0-9]{1,400}(?:\.[0-9]{1,400})?|\.[0-9]{1,400})"
_SIZE_RE = re.compile(rf"\s*({_NUMBER})\s*([A-Za-z]*)\s*\Z")
_SIZE_EXAMPLE = "expected a size such as 8GiB, 500MB or 1048576"

_DURATION_UNITS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}
_DURATION_PART_RE = re.compile(rf"({_NUMBER})(ms|s|m|h)")
_DURATION_NUMBER_RE = re.compile(rf"{_NUMBER}\Z")
_DURATION_EXAMPLE = "expected a duration such as 5s, 250ms, 2m or 1h30m"


def parse_size(text: object) -> int:
    """Parse a byte count.

    Accepted: a non-negative integer, or a string holding a number (decimals
    allowed) and an optional unit, case-insensitive, space between allowed:
    ``B``; decimal ``k``/``KB`` (1000), ``M``/``MB``, ``G``/``GB``, ``T``/``TB``;
    binary ``Ki``/``KiB`` (1024), ``MiB``, ``GiB``, ``TiB``. The result must be a
    whole number of bytes (``1.5KiB`` is 1536; ``0.5B`` is refused).

    Args:
        text: the value as found in the file or on the command line.

    Returns:
        The size in bytes.

    Raises:
        ValueError: with a one-line reason that quotes the value.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{_SIZE_EXAMPLE}, got {text} (negative)")
        return text
    if not isinstance(text, str):
        raise ValueError(f"{_SIZE_EXAMPLE}, got {_describe(text)}")
    match = _SIZE_RE.match(text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{_SIZE_EXAMPLE}, got {text!r}")
    value = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value.denominator != 1:
        raise ValueError(f"{_SIZE_EXAMPLE}, got {text!r} (not a whole number of bytes)")
    return int(value)


def format_size(size: int) -> str:
    """Format a byte count in the largest binary unit that divides it exactly.

    ``parse_size(format_size(n)) == n`` for every ``n >= 0``.

    Args:
        size: a non-negative number of bytes.

    Returns:
        For example ``"8GiB"``, ``"1536KiB"`` or ``"1000"``.
    """
    if size < 0:
        raise ValueError(f"size must not be negative, got {size}")
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_duration(text: object) -> float:
    """Parse a duration in seconds.

    Accepted: a non-negative finite number (seconds), or a string of one or more
    number+unit parts with units ``ms``, ``s``, ``m`` (minutes) and ``h``, as in
    ``5s``, ``250ms``, ``2m``, ``1h30m``, ``1.5s``; a bare number string is
    seconds. Units are case-insensitive; spaces around the value are ignored.

    Args:
        text: the value as found in the file or on the command line.

    Returns:
        The duration in seconds.

    Raises:
        ValueError: with a one-line reason that quotes the value.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        try:
            seconds = float(text)
        except OverflowError:
            raise ValueError(f"{_DURATION_EXAMPLE}, got {text!r} (too large)") from None
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"{_DURATION_EXAMPLE}, got {_describe(text)}")
        return seconds
    if not isinstance(text, str):
        raise ValueError(f"{_DURATION_EXAMPLE}, got {_describe(text)}")
    body = text.strip().lower()
    if _DURATION_NUMBER_RE.match(body):
        total = Fraction(body)
    else:
        total = Fraction(0)
        pos = 0
        while pos < len(body):
            part = _DURATION_PART_RE.match(body, pos)
            if part is None:
                break
            total += Fraction(part.group(1)) * _DURATION_UNITS[part.group(2)]
            pos = part.end()
        if not body or pos != len(body):
            raise ValueError(f"{_DURATION_EXAMPLE}, got {text!r}")
    try:
        return float(total)
    except OverflowError:
        raise ValueError(f"{_DURATION_EXAMPLE}, got {text!r} (too large)") from None


def format_duration(seconds: float) -> str:
    """Format seconds as the shortest exact duration string.

    ``parse_duration(format_duration(s)) == s`` for every finite ``s >= 0``.

    Args:
        seconds: a finite, non-negative number of seconds.

    Returns:
        For example ``"1h"``, ``"2m"``, ``"15s"`` or ``"0.25s"``.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be finite and not negative, got {seconds!r}")
    if seconds == int(seconds):
        whole = int(seconds)
        for unit, factor in (("h", 3600), ("m", 60)):
            if whole and whole % factor == 0:
                return f"{whole // factor}{unit}"
        return f"{whole}s"
    # repr() is the shortest decimal that reads back as the same float; "f"
    # spells it without the exponent that parse_duration does not accept.
    return format(Decimal(repr(float(seconds))), "f") + "s"


# -- reading YAML with line numbers -------------------------------------------

_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _describe(value: object) -> str:
    """Name a YAML value's kind and show it, for 'expected X, got Y' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"date {value.isoformat()}"
    if isinstance(value, bytes):
        return "binary data"
    return f"a {type(value).__name__}"


def _describe_node(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "a scalar"


class _Document:
    """A composed YAML file: the node tree plus what error messages need."""

    def __init__(self, shown: str, path: Path) -> None:
        self.shown = shown  # the file name as the user gave it, for messages
        self.path = path.absolute()
        self.base = self.path.parent  # relative paths in the file are relative to this
        self._constructor = yaml.constructor.SafeConstructor()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigFileError(path=shown, reason=exc.strerror or str(exc)) from exc
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise ConfigSyntaxError(
                path=shown, line=line, reason=f"not UTF-8 text (byte 0x{data[exc.start]:02x})"
            ) from exc
        try:
            self.root: Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            char = exc.character if isinstance(exc.character, str) else chr(exc.character)
            raise ConfigSyntaxError(
                path=shown, line=line, reason=f"{exc.reason} (U+{ord(char):04X})"
            ) from exc
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            reason = exc.problem or exc.context or "malformed"
            if exc.problem and exc.context and exc.problem.startswith("but "):
                reason = f"{exc.context}, {exc.problem}"  # PyYAML splits one sentence in two
            elif exc.problem and exc.context:
                where = f" on line {exc.context_mark.line + 1}" if exc.context_mark else ""
                reason += f" ({exc.context}{where})"
            if exc.problem and "'\\t'" in exc.problem:
                reason = "found a tab character; YAML indents with spaces only"
            raise ConfigSyntaxError(path=shown, line=line, reason=" ".join(reason.split())) from exc
        except yaml.YAMLError as exc:  # not raised by PyYAML 6 today; keep the promise anyway
            raise ConfigSyntaxError(path=shown, line=1, reason=" ".join(str(exc).split())) from exc
        except RecursionError as exc:  # PyYAML's composer recurses once per nesting level
            raise ConfigSyntaxError(path=shown, line=1, reason="nested too deeply") from exc

    def fail(self, node: Node | None, key: str, reason: str) -> NoReturn:
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigValueError(path=self.shown, line=line, key=key, reason=reason)

    def value(self, node: Node, key: str, what: str = "a single value") -> object:
        """The Python value of a scalar node (None for a null); ``what`` names the expected value."""
        if not isinstance(node, ScalarNode):
            self.fail(node, key, f"expected {what}, got {_describe_node(node)}")
        try:
            return self._constructor.construct_object(node)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            self.fail(node, key, " ".join(problem.split()))

    def mapping(
        self, node: Node | None, prefix: str, allowed: tuple[str, ...], what: str
    ) -> _Map:
        """Check that ``node`` is a mapping with only ``allowed`` keys, each once."""
        if not isinstance(node, MappingNode):
            got = _describe_node(node) if node is not None else "nothing"
            if isinstance(node, ScalarNode):
                got = _describe(self.value(node, prefix or "top level"))
            self.fail(node, prefix or "top level", f"expected {what}, got {got}")
        own: dict[str, Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._key(key_node, prefix)
            if key in own:
                first = own[key].start_mark.line + 1
                self.fail(key_node, _join(prefix, key), f"duplicate key (first given on line {first})")
            own[key] = key_node
        try:
            self._constructor.flatten_mapping(node)  # resolves '<<' merge keys in place
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            self.fail(node, prefix or "top level", " ".join(problem.split()))
        entries: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, prefix)
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else "allowed keys: " + ", ".join(allowed)
                self.fail(key_node, _join(prefix, key), f"unknown key; {hint}")
            entries[key] = (key_node, value_node)  # later wins: own keys override merged ones
        return _Map(self, node, prefix, entries)

    def sequence(self, node: Node, key: str, what: str) -> list[Node]:
        if not isinstance(node, SequenceNode):
            got = _describe(self.value(node, key)) if isinstance(node, ScalarNode) else "a mapping"
            self.fail(node, key, f"expected {what}, got {got}")
        return list(node.value)

    def _key(self, key_node: Node, prefix: str) -> str:
        key = self.value(key_node, prefix or "top level") if isinstance(key_node, ScalarNode) else None
        if not isinstance(key, str):
            got = _describe(key) if isinstance(key_node, ScalarNode) else _describe_node(key_node)
            self.fail(key_node, prefix or "top level", f"keys must be names, got {got}")
        return key


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


class _Map:
    """The checked entries of one YAML mapping, with typed getters that fail precisely."""

    def __init__(self, doc: _Document, node: MappingNode, prefix: str, entries: dict) -> None:
        self.doc = doc
        self.node = node
        self.prefix = prefix
        self.entries: dict[str, tuple[Node, Node]] = entries

    def key(self, key: str) -> str:
        return _join(self.prefix, key)

    def node_of(self, key: str) -> Node | None:
        """The value node of ``key``, or None when absent or null."""
        if key not in self.entries:
            return None
        node = self.entries[key][1]
        if isinstance(node, ScalarNode) and node.tag == _NULL_TAG:
            return None
        return node

    def line_node(self, key: str) -> Node:
        """The node to blame for ``key``: its value, its key, or the mapping itself."""
        if key in self.entries:
            return self.entries[key][1]
        return self.node

    def fail(self, key: str, reason: str) -> NoReturn:
        self.doc.fail(self.line_node(key), self.key(key), reason)

    def failer(self, key: str) -> Callable[[str], NoReturn]:
        return lambda reason: self.fail(key, reason)

    def require(self, key: str) -> Node:
        node = self.node_of(key)
        if node is None:
            self.fail(key, "required key has no value" if key in self.entries else "required key is missing")
        return node

    def raw(self, key: str, what: str) -> object:
        """The scalar value of ``key``, or None when absent or null; ``what`` names the expected value."""
        node = self.node_of(key)
        return None if node is None else self.doc.value(node, self.key(key), what)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        if required:
            self.require(key)
        value = self.raw(key, "a string")
        if value is None:
            return default
        if not isinstance(value, str):
            extra = ""
            if isinstance(value, bool):
                extra = " (YAML reads yes/no/on/off as booleans; quote the value)"
            elif isinstance(value, (int, float)):
                extra = " (quote the value)"
            self.fail(key, f"expected a string, got {_describe(value)}{extra}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, "on/off or true/false")
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("on", "off"):
            return value.lower() == "on"
        self.fail(key, f"expected on/off or true/false, got {_describe(value)}")

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.raw(key, f"one of {', '.join(choices)}")
        if value is None:
            return default
        if value not in choices:  # also catches non-strings such as `compress: off` (false)
            self.fail(key, f"expected one of {', '.join(choices)}, got {_describe(value)}")
        return value

    def size(self, key: str, default: int) -> int:
        value = self.raw(key, "a size such as 8GiB")
        if value is None:
            return default
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(key, str(exc))

    def duration(self, key: str, default: float) -> float:
        value = self.raw(key, "a duration such as 5s")
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(key, str(exc))
        if seconds <= 0:
            self.fail(key, f"must be longer than zero, got {_describe(value)}")
        return seconds

    def path(self, key: str, *, required: bool = False) -> Path | None:
        text = self.string(key, required=required)
        if text is None:
            return None
        if not text or "\0" in text:
            self.fail(key, f"expected a path, got {text!r}")
        return _absolute(text, self.doc.base)

    def strings(self, key: str) -> tuple[str, ...]:
        node = self.node_of(key)
        if node is None:
            return ()
        items = self.doc.sequence(node, self.key(key), "a list of strings")
        result = []
        for i, item in enumerate(items):
            item_key = f"{self.key(key)}[{i}]"
            value = self.doc.value(item, item_key, "a non-empty string")
            if not isinstance(value, str) or not value or "\0" in value:
                self.doc.fail(item, item_key, f"expected a non-empty string, got {_describe(value)}")
            result.append(value)
        return tuple(result)

    def sub(self, key: str, allowed: tuple[str, ...], what: str) -> _Map | None:
        """The nested mapping under ``key``, or None when absent or null."""
        node = self.node_of(key)
        if node is None:
            return None
        return self.doc.mapping(node, self.key(key), allowed, what)


# -- checks shared by both files ------------------------------------------------


def _absolute(text: str, base: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _within(inner: Path, outer: Path) -> bool:
    """True if ``inner`` is ``outer`` or below it (both already resolved)."""
    return inner == outer or outer in inner.parents


def _refuse_overlap(top: _Map, key: str, inner: Path, inner_what: str, outer: Path, outer_what: str) -> None:
    """Fail at ``key`` if ``inner`` is ``outer`` or inside it (both resolved)."""
    if inner == outer:
        top.fail(key, f"{inner_what} is also {outer_what}")
    if outer in inner.parents:
        top.fail(key, f"{inner_what} is inside {outer_what} {outer}")


def _check_name(name: str, fail: Callable[[str], NoReturn]) -> str:
    if not _NAME_RE.match(name):
        fail(f"{_NAME_RULE}, got {name!r}")
    return name


def _check_dir(path: Path, fail: Callable[[str], NoReturn]) -> Path:
    """An existing directory, returned resolved."""
    try:
        st = path.stat()
    except FileNotFoundError:
        fail(f"directory {path} does not exist")
    except NotADirectoryError:
        fail(f"directory {path} does not exist (a parent is not a directory)")
    except OSError as exc:
        fail(f"cannot access {path}: {exc.strerror}")
    if not stat.S_ISDIR(st.st_mode):
        fail(f"{path} is not a directory")
    return path.resolve(strict=True)


def _check_secret_file(path: Path, fail: Callable[[str], NoReturn]) -> Path:
    """The secret file must exist and not be a directory; reading it is the daemon's business."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        fail(f"file {path} does not exist")
    except PermissionError:
        return path  # cannot look from here; the daemon may run as another user
    except OSError as exc:
        fail(f"cannot access {path}: {exc.strerror}")
    if stat.S_ISDIR(st.st_mode):
        fail(f"{path} is a directory, expected a file")
    return path


def _parse_address(text: str, *, listen: bool) -> tuple[str, int]:
    """Split ``HOST[:PORT]`` or ``[IPV6][:PORT]``; port defaults to 7070.

    With ``listen``, the host may be empty (all interfaces) and port 0 means any.
    Raises ValueError with the reason.
    """
    expected = "expected HOST:PORT"
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        rest = text[close + 1 :] if close >= 0 else ""
        if close < 0 or (rest and not rest.startswith(":")):
            raise ValueError(f"{expected}, got {text!r}")
        host, port_text = text[1:close], rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{expected}, got {text!r} ({host!r} is not an IPv6 address)") from None
    else:
        if text.count(":") > 1:
            hint = "write an IPv6 address in brackets, as in [::1]:7070"
            raise ValueError(f"{expected}, got {text!r} ({hint})")
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if not host:
            if not listen:
                raise ValueError(f"{expected}, got {text!r} (no host)")
            host = DEFAULT_LISTEN_HOST
        elif not _HOST_RE.match(host):
            raise ValueError(f"{expected}, got {text!r} ({host!r} is not a host name or address)")
    if port_text is None:
        return host, DEFAULT_PORT
    lowest = 0 if listen else 1
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{expected}, got {text!r}")
    port = int(port_text)
    if not lowest <= port <= 65535:
        raise ValueError(f"{expected} with a port from {lowest} to 65535, got {text!r}")
    return host, port


# -- vault.yaml ------------------------------------------------------------------

_VAULT_KEYS = (
    "vault",
    "backing",
    "state_dir",
    "exclude",
    "forwarding",
    "secret_file",
    "journal",
    "targets",
    "failover",
    "allow_other",
    "metrics",
)
_TARGET_KEYS = ("name", "address", "mode", "sync_timeout", "on_timeout", "compress", "bandwidth", "tls")
_TLS_KEYS = ("cert", "key", "fingerprint", "ca")
_JOURNAL_KEYS = ("max_size", "when_full")
_FAILOVER_KEYS = ("heartbeat", "health")


def load_vault_config(path: Path | str, *, mountpoint: Path | None = None) -> VaultConfig:
    """Read and check a vault.yaml.

    Args:
        path: the file; messages name it exactly as given here.
        mountpoint: where the vault will be mounted, if known. Then the backing
            dir and the state dir must not be inside it, nor it inside them.

    Returns:
        The complete, checked configuration, defaults filled in.

    Raises:
        ConfigFileError: the file is missing or unreadable (exit 11).
        ConfigSyntaxError: the file is not valid YAML (exit 12).
        ConfigValueError: a key is unknown, missing, of the wrong type or has a
            bad value, or the directories overlap (exit 13).
    """
    doc = _Document(str(path), Path(path))
    top = doc.mapping(doc.root, "", _VAULT_KEYS, "a mapping of keys such as vault: and backing:")

    name = _check_name(top.string("vault", required=True), top.failer("vault"))
    backing = _check_dir(top.path("backing", required=True), top.failer("backing"))

    state_given = top.path("state_dir")
    if state_given is None:
        if backing.parent == backing:
            top.fail("backing", f"{backing} has no parent to hold the default state_dir; set state_dir")
        state_dir = backing.parent / (backing.name + STATE_DIR_SUFFIX)
        state_key, state_what = "backing", f"the default state_dir {state_dir}"
    else:
        state_dir = _real(state_given)
        state_key, state_what = "state_dir", f"{state_dir}"
    _refuse_overlap(top, state_key, state_dir, state_what, backing, "the backing directory")
    if state_given is not None:
        _refuse_overlap(top, "state_dir", backing, f"the backing directory {backing}", state_dir, "the state_dir")

    if mountpoint is not None:
        mnt = _real(Path(mountpoint).absolute())
        _refuse_overlap(top, "backing", backing, f"{backing}", mnt, "the mountpoint")
        _refuse_overlap(top, "backing", mnt, f"the mountpoint {mnt}", backing, "the backing directory")
        _refuse_overlap(top, state_key, state_dir, state_what, mnt, "the mountpoint")
        _refuse_overlap(top, state_key, mnt, f"the mountpoint {mnt}", state_dir, "the state_dir")

    secret = top.path("secret_file")
    if secret is not None:
        secret = _check_secret_file(secret, top.failer("secret_file"))

    journal_map = top.sub("journal", _JOURNAL_KEYS, "a mapping with max_size and when_full")
    if journal_map is None:
        journal = JournalConfig(max_size_bytes=DEFAULT_JOURNAL_MAX_SIZE, when_full="block")
    else:
        max_size = journal_map.size("max_size", DEFAULT_JOURNAL_MAX_SIZE)
        if max_size <= 0:
            journal_map.fail("max_size", "must be larger than zero")
        when_full = journal_map.choice("when_full", WHEN_FULL, "block")
        journal = JournalConfig(max_size_bytes=max_size, when_full=when_full)

    failover = top.sub("failover", _FAILOVER_KEYS, "a mapping with heartbeat and health")
    heartbeat = failover.duration("heartbeat", DEFAULT_HEARTBEAT_S) if failover else DEFAULT_HEARTBEAT_S
    health = _health(failover, "health", listen=True) if failover else None
    if health is not None and secret is None:
        failover.fail("health", "needs secret_file (health probes are authenticated)")

    return VaultConfig(
        path=doc.path,
        vault=name,
        backing=backing,
        state_dir=state_dir,
        exclude=top.strings("exclude"),
        forwarding=top.boolean("forwarding", True),
        secret_file=secret,
        journal=journal,
        targets=_targets(doc, top),
        heartbeat_s=heartbeat,
        allow_other=top.boolean("allow_other", False),
        metrics=_metrics(top),
        health=health,
    )


def _targets(doc: _Document, top: _Map) -> tuple[TargetConfig, ...]:
    node = top.node_of("targets")
    if node is None:
        return ()
    targets: list[TargetConfig] = []
    seen: dict[str, tuple[int, Node]] = {}
    for i, item in enumerate(doc.sequence(node, "targets", "a list of targets")):
        t = doc.mapping(item, f"targets[{i}]", _TARGET_KEYS, "a mapping with name and address")
        name = _check_name(t.string("name", required=True), t.failer("name"))
        if name in seen:
            first, first_node = seen[name]
            where = f"targets[{first}], line {first_node.start_mark.line + 1}"
            t.fail("name", f"duplicate target name {name!r} (also {where})")
        seen[name] = (i, t.line_node("name"))
        try:
            host, port = _parse_address(t.string("address", required=True), listen=False)
        except ValueError as exc:
            t.fail("address", str(exc))
        bandwidth = t.raw("bandwidth", "bytes per second such as 10MiB")
        if isinstance(bandwidth, str) and bandwidth.rstrip().lower().endswith("/s"):
            bandwidth = bandwidth.rstrip()[:-2]  # "10MiB/s" reads as "10MiB" (per second)
        try:
            bandwidth_bps = 0 if bandwidth is None else parse_size(bandwidth)
        except ValueError as exc:
            t.fail("bandwidth", str(exc).replace("a size such as", "bytes per second such as"))
        targets.append(
            TargetConfig(
                name=name,
                host=host,
                port=port,
                mode=t.choice("mode", MODES, "async"),
                sync_timeout_s=t.duration("sync_timeout", DEFAULT_SYNC_TIMEOUT_S),
                on_timeout=t.choice("on_timeout", ON_TIMEOUT, "degrade"),
                compress=t.choice("compress", COMPRESS, "auto"),
                bandwidth_bps=bandwidth_bps,
                tls=_tls(t, primary=True),
            )
        )
    return tuple(targets)


def _tls(top: _Map, *, primary: bool) -> TlsSettings | None:
    """``tls:`` of a target (``primary``) or of SERVE.yaml; absent, null or off = plain TCP."""
    node = top.node_of("tls")
    if node is None:
        return None
    if isinstance(node, ScalarNode):
        value = top.raw("tls", "a mapping with cert, key, fingerprint or ca, or off")
        if value is False or (isinstance(value, str) and value.strip().lower() == "off"):
            return None
        top.fail("tls", f"expected a mapping with cert, key, fingerprint or ca, or off, got {_describe(value)}")
    m = top.sub("tls", _TLS_KEYS, "a mapping with cert, key, fingerprint or ca")
    assert m is not None

    def existing(key: str) -> Path | None:
        path = m.path(key)
        return None if path is None else _check_secret_file(path, m.failer(key))

    cert, key, ca = existing("cert"), existing("key"), existing("ca")
    if (cert is None) != (key is None):
        m.fail("cert" if cert is None else "key", "cert and key go together: give both or neither")
    fingerprint = m.string("fingerprint")
    if fingerprint is not None:
        if not primary:
            m.fail("fingerprint", "a target checks primaries by ca: (a file of their certificates), "
                                  "not by fingerprint")
        try:
            fingerprint = normalize_fingerprint(fingerprint)
        except ValueError as exc:
            m.fail("fingerprint", str(exc))
    if primary and fingerprint is None and ca is None:
        m.fail("fingerprint", "give the target's certificate fingerprint (as `octofs keygen` prints it) "
                              "or a ca: file, so that the target is checked")
    if primary and fingerprint is not None and ca is not None:
        m.fail("ca", "give either fingerprint or ca, not both")
    if not primary and cert is None:
        m.fail("cert", "a target needs its certificate and key (make them with `octofs keygen DIR`)")
    return TlsSettings(cert=cert, key=key, fingerprint=fingerprint, ca=ca)


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` of a metrics endpoint: port 9108 when omitted, 0 = any free port.

    An empty host (``:9108``) means all IPv4 interfaces. Raises ValueError with the reason.
    """
    stripped = text.strip()
    has_port = stripped.rpartition("]")[2].startswith(":") if stripped.startswith("[") else ":" in stripped
    host, port = _parse_address(text, listen=True)
    return host, port if has_port else DEFAULT_METRICS_PORT


def _metrics(top: _Map) -> tuple[str, int] | None:
    """``metrics:`` (vault.yaml and SERVE.yaml): an address, or off/absent for no endpoint."""
    value = top.raw("metrics", "HOST:PORT, or off")
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    if not isinstance(value, str):
        top.fail("metrics", f"expected HOST:PORT such as 127.0.0.1:9108, or off, got {_describe(value)}")
    try:
        return parse_metrics_address(value)
    except ValueError as exc:
        top.fail("metrics", str(exc))


def _health(m: _Map, key: str, *, listen: bool) -> tuple[str, int] | None:
    """A health responder address ``HOST[:PORT]`` (port 7071 when omitted), or None when absent."""
    text = m.string(key)
    if text is None:
        return None
    stripped = text.strip()
    has_port = stripped.rpartition("]")[2].startswith(":") if stripped.startswith("[") else ":" in stripped
    try:
        host, port = _parse_address(text, listen=listen)
    except ValueError as exc:
        m.fail(key, str(exc))
    return host, port if has_port else DEFAULT_HEALTH_PORT


# -- SERVE.yaml --------------------------------------------------------------------

_SERVE_KEYS = ("root", "listen", "secret_file", "discovery", "takeover_hooks", "name", "metrics", "health",
               "failover", "tls")
_SERVE_FAILOVER_KEYS = ("vault", "heartbeat", "primary", "witness", "mount", "hooks", "hook_timeout", "health",
                        "targets")


def _serve_failover(doc: _Document, top: _Map, default_hooks: tuple[str, ...]) -> tuple[FailoverConfig, ...]:
    node = top.node_of("failover")
    if node is None:
        return ()
    out: list[FailoverConfig] = []
    seen: set[str] = set()
    for i, item in enumerate(doc.sequence(node, "failover", "a list of vaults to watch")):
        m = doc.mapping(item, f"failover[{i}]", _SERVE_FAILOVER_KEYS, "a mapping with vault, primary and mount")
        vault = _check_name(m.string("vault", required=True), m.failer("vault"))
        if vault in seen:
            m.fail("vault", f"vault {vault!r} is listed twice")
        seen.add(vault)
        m.require("primary")
        primary = _health(m, "primary", listen=False)
        assert primary is not None
        mount = m.path("mount", required=True)
        hooks = m.strings("hooks") if m.node_of("hooks") is not None else default_hooks
        targets = []
        for name, address in _failover_targets(doc, m):
            try:
                host, port = _parse_address(address, listen=False)
            except ValueError as exc:
                m.fail("targets", str(exc))
            targets.append((name, host, port))
        out.append(FailoverConfig(
            vault=vault,
            heartbeat_s=m.duration("heartbeat", DEFAULT_HEARTBEAT_S),
            primary=primary,
            witness=_health(m, "witness", listen=False),
            mount=mount,
            hooks=hooks,
            hook_timeout_s=m.duration("hook_timeout", DEFAULT_HOOK_TIMEOUT_S),
            health=_health(m, "health", listen=True),
            targets=tuple(targets),
        ))
    return tuple(out)


def _failover_targets(doc: _Document, m: _Map) -> list[tuple[str, str]]:
    """``targets:`` of a failover entry: a list of ``{name, address}`` for the new primary's vault.yaml."""
    node = m.node_of("targets")
    if node is None:
        return []
    out = []
    for j, item in enumerate(doc.sequence(node, m.key("targets"), "a list of targets")):
        t = doc.mapping(item, f"{m.key('targets')}[{j}]", ("name", "address"), "a mapping with name and address")
        out.append((_check_name(t.string("name", required=True), t.failer("name")),
                    t.string("address", required=True)))
    return out


def _flag_failer(flag: str) -> Callable[[str], NoReturn]:
    def fail(reason: str) -> NoReturn:
        raise UsageError(detail=f"{flag}: {reason}")

    return fail


def load_serve_config(
    path: Path | str | None,
    *,
    root: Path | str | None = None,
    listen: str | None = None,
    secret_file: Path | str | None = None,
    discovery: bool | None = None,
    name: str | None = None,
    metrics: str | None = None,
) -> ServeConfig:
    """Read and check a SERVE.yaml (optional) and apply the ``octofs serve`` flags.

    A flag given here overrides the same key in the file. Relative flag paths
    are relative to the current directory.

    Args:
        path: the SERVE.yaml, or None to configure from flags alone.
        root: ``--root DIR``.
        listen: ``--listen HOST:PORT``; the host may be empty (all interfaces),
            the port defaults to 7070 and may be 0 (any free port).
        secret_file: ``--secret-file FILE``.
        discovery: ``--no-discovery`` (False), or None to use the file.
        name: ``--name NAME``: what ``octofs discover`` shows.
        metrics: ``--metrics HOST:PORT``.

    Returns:
        The complete, checked configuration.

    Raises:
        ConfigFileError, ConfigSyntaxError, ConfigValueError: a problem in the
            file (exit 11, 12, 13).
        UsageError: a bad flag value, or no root at all (exit 2).
    """
    top: _Map | None = None
    doc: _Document | None = None
    if path is not None:
        doc = _Document(str(path), Path(path))
        top = doc.mapping(doc.root, "", _SERVE_KEYS, "a mapping of keys such as root: and listen:")

    if root is not None:
        root_path = _check_dir(Path(root).expanduser().absolute(), _flag_failer("--root"))
    elif top is not None and top.node_of("root") is not None:
        root_path = _check_dir(top.path("root"), top.failer("root"))
    else:
        raise UsageError(
            detail="no root directory for received vaults: give --root DIR or set root in SERVE.yaml"
        )

    if listen is not None:
        try:
            host, port = _parse_address(listen, listen=True)
        except ValueError as exc:
            _flag_failer("--listen")(str(exc))
    elif top is not None and top.node_of("listen") is not None:
        try:
            host, port = _parse_address(top.string("listen"), listen=True)
        except ValueError as exc:
            top.fail("listen", str(exc))
    else:
        host, port = DEFAULT_LISTEN_HOST, DEFAULT_PORT

    secret: Path | None = None
    if secret_file is not None:
        secret = _check_secret_file(Path(secret_file).expanduser().absolute(), _flag_failer("--secret-file"))
    elif top is not None and top.node_of("secret_file") is not None:
        secret = _check_secret_file(top.path("secret_file"), top.failer("secret_file"))

    if name is not None:
        name = _check_name(name, _flag_failer("--name"))
    elif top is not None and top.node_of("name") is not None:
        name = _check_name(top.string("name"), top.failer("name"))

    metrics_address: tuple[str, int] | None = None
    if metrics is not None:
        try:
            metrics_address = parse_metrics_address(metrics)
        except ValueError as exc:
            _flag_failer("--metrics")(str(exc))
    elif top is not None:
        metrics_address = _metrics(top)

    if discovery is None:
        discovery = top.boolean("discovery", True) if top else True

    hooks = top.strings("takeover_hooks") if top else ()
    failover = _serve_failover(doc, top, hooks) if top is not None and doc is not None else ()
    health = _health(top, "health", listen=True) if top is not None else None
    if (failover or health) and secret is None:
        assert top is not None
        top.fail("failover" if failover else "health", "needs secret_file (health probes are authenticated)")

    return ServeConfig(
        root=root_path,
        listen_host=host,
        listen_port=port,
        secret_file=secret,
        discovery=discovery,
        takeover_hooks=hooks,
        path=doc.path if doc else None,
        name=name,
        metrics=metrics_address,
        health=health,
        failover=failover,
        tls=_tls(top, primary=False) if top is not None else None,
    )
