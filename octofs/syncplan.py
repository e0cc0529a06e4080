"""syncplan.py: owns what one Synchronize decides: which paths to compare, what differs, which repairs to send.

It is the synchronous heart of ``octofs sync`` (DESIGN, Synchronize); syncer.py
drives it over a shipper's connection, and the unit tests drive it against two
local directories. No trio, no I/O but reads of the primary's backing dir.

How a Synchronize stays correct while the application keeps writing
(docs/ARCHITECTURE.md, Synchronize):

- **Repairs are state-setting.** A repair is made of ordinary ops (plus
  ``RemoveTreeOp``) that set a path to what the primary has *at the moment the
  repair is produced*; it is produced while no change can reach the backing dir
  (the recorder is paused) and sent right after the last journal record, so it
  is correct for the target at that point in the stream whatever the target had
  before. Sending a repair that was not needed costs bytes, never correctness.
- **Skipping needs a quiet window.** A comparison is made of the target's answer
  (taken after record P, where the query sat in the stream) and the primary's own
  reading (taken after P, finished by N). A path is judged equal only if no op in
  (P, N] touched it: every op journaled meanwhile is noted (``note``), and a path
  whose entry was created, removed or renamed in the window is compared again
  later; blocks written in the window are simply sent. After ``MAX_ATTEMPTS``
  busy windows a path is copied whole (a repair, so always correct).
- **Moves are followed.** The destination of every rename or link journaled during
  the Synchronize is compared again (it may bring a not yet verified tree into an
  already verified part).

The walk is in path order (components compared bytewise), so ``cursor`` — the
smallest path not yet verified — is enough to resume an interrupted Synchronize.
"""

from __future__ import annotations

import heapq
import os
import stat
from collections import deque
from dataclasses import dataclass, field

from octofs import scan
from octofs.exclude import ExcludeFilter
from octofs.ops import (
    CreateOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    Op,
    RemoveTreeOp,
    RemovexattrOp,
    RenameOp,
    SetattrOp,
    SetxattrOp,
    SymlinkOp,
    TruncateOp,
    WriteOp,
)

MAX_ATTEMPTS = 5
# A directory copied whole is rebuilt on the target, its whole tree sent again: a listing waits
# longer for a quiet window (a listing is busy only while the directory itself or an ancestor moves).
MAX_LIST_ATTEMPTS = 20
# A verify-only pass cannot copy a path that changes in every window: after this many busy windows it
# reports the path as not verified (an application writing it all along) and goes on.
MAX_VERIFY_ATTEMPTS = 20
QUERY_ITEMS = 256
QUERY_HASH_BYTES = 64 * 2**20
MAX_DIFFERENCE_LINES = 1000
MAX_MOVED_PATHS = 100_000

# Ops that change which entries exist (as opposed to data or metadata).
_STRUCTURAL = ("CreateOp", "MkdirOp", "MknodOp", "SymlinkOp", "LinkOp", "UnlinkOp", "RmdirOp", "RenameOp",
               "RemoveTreeOp")
# Fields of scan.differences a setattr/xattr op changes, and those a write or truncate changes.
_META_FIELDS = frozenset({"mode", "owner", "size", "mtime", "xattrs"})
_DATA_FIELDS = frozenset({"size", "mtime"})


def path_key(path: bytes) -> tuple[bytes, ...]:
    """The walk order: by components, so a directory comes right before its contents."""
    return tuple(path.split(b"/")) if path else ()


def _is_under(path: bytes, top: bytes) -> bool:
    return path == top or not top or path.startswith(top + b"/")


@dataclass
class Touches:
    """What the ops of one window (P, N] changed."""

    entries: set[bytes] = field(default_factory=set)  # paths created, removed or moved (either end)
    data: dict[bytes, list[tuple[int, int]]] = field(default_factory=dict)  # path -> (offset, end) written
    meta: set[bytes] = field(default_factory=set)  # setattr / xattr
    upto: int = 0  # the window's last seq
    names_changed: bool = False  # a link, unlink or rename (any path): link counts are unreliable

    def entry_touched(self, path: bytes) -> bool:
        """The entry at ``path`` or one of its ancestors was created, removed or moved."""
        if not self.entries:
            return False
        if b"" in self.entries:
            return True
        parts = path.split(b"/")
        return any(b"/".join(parts[:i]) in self.entries for i in range(1, len(parts) + 1))

    def listing_touched(self, directory: bytes) -> bool:
        """The directory itself (or an ancestor) changed, so its whole listing is unreliable."""
        return bool(directory) and self.entry_touched(directory)


@dataclass
class Stats:
    dirs: int = 0
    files: int = 0
    bytes_compared: int = 0
    bytes_known: int = 0
    repair_bytes: int = 0
    repairs: int = 0
    differences: int = 0
    rechecks: int = 0
    unverified: int = 0  # verify: paths busy in every window, left unverified


@dataclass
class _Action:
    kind: str  # replace | remove | meta | blocks | link
    path: bytes
    blocks: deque = field(default_factory=deque)  # block indexes still to send (blocks)
    target_xattrs: tuple[bytes, ...] = ()  # names the target has (meta)
    src: bytes = b""  # link source
    attempts: int = 0
    fresh: bool = False  # blocks of a file just recreated (all zero so far)


class SyncPlan:
    """One Synchronize (or verify-only pass) of one target, as data and decisions.

    Args:
        root_fd: the primary's backing dir (an fd this plan does not close).
        owners: whether the target reproduces owners (it runs as root).
        exclude: the vault's exclude filter (excluded paths are neither compared nor removed).
        verify: only report differences (``differences``); produce no repairs.
        paths: compare only these paths (and what is under them); None = the whole vault.
        cursor: resume: paths before it in walk order are already verified.
        block_size: the hash block size.
    """

    def __init__(self, root_fd: int, *, owners: bool, exclude: ExcludeFilter | None = None, verify: bool = False,
                 paths: list[bytes] | None = None, cursor: bytes | None = None,
                 block_size: int = scan.BLOCK_SIZE) -> None:
        self.root_fd = root_fd
        self.owners = owners
        self.exclude = exclude or ExcludeFilter()
        self.verify = verify
        self.block_size = block_size
        self.resume_key = path_key(cursor) if cursor else None
        self.stats = Stats()
        self.lines: list[str] = []  # differences found (verify), capped
        self.unverified_lines: list[str] = []  # verify: paths busy in every window, capped
        self._unverified: set[bytes] = set()
        self._queue: list[tuple[tuple[bytes, ...], str, bytes, int]] = []
        self._queued: set[tuple[str, bytes]] = set()
        self._inflight: dict[int, list[tuple[str, bytes, int]]] = {}
        self._actions: deque[_Action] = deque()
        self._log: list[tuple[int, Op]] = []
        # primary inode -> (its first name compared, that name's target inode, the comparison's last seq)
        self._links: dict[int, tuple[bytes, int | None, int]] = {}
        # target inode -> (the primary inode it stands for, the name compared, the comparison's last seq)
        self._target_inodes: dict[int, tuple[int, bytes, int]] = {}
        self._on_target: dict[int, bytes] = {}  # primary inode -> a name of it the target has (seen or repaired)
        self._stream_links: dict[bytes, set[bytes]] = {}  # path -> the names the stream linked it with
        self._moved: dict[bytes, int] = {}  # path -> the last seq that created, removed or moved it
        self._moved_floor = 0
        self._last_seq = 0  # the last seq noted
        self._shared: set[bytes] = set()  # regular files compared with more than one name
        self._joined: dict[int, dict[bytes, tuple[bytes, int]]] = {}  # inode -> {name: (linked to, at seq)} by repairs
        self._size_hint: dict[bytes, int] = {}
        self._next_req = 1
        for p in (paths if paths is not None else [b""]):
            # A path-scoped Synchronize compares each path's ancestors as entries only (not their
            # whole listings), so that a missing parent is created before what goes in it.
            parts = p.split(b"/") if p else []
            for i in range(len(parts)):
                self._push("entry", b"/".join(parts[:i]), 0)
            self._push("stat", p, 0)

    # -- the work queue -----------------------------------------------------------------

    def _push(self, kind: str, path: bytes, attempts: int) -> None:
        if (kind, path) in self._queued:
            return
        self._queued.add((kind, path))
        heapq.heappush(self._queue, (path_key(path), kind, path, attempts))

    def recheck(self, path: bytes) -> None:
        """Compare ``path`` (again), e.g. because an op changed it while nobody was watching."""
        self._push("stat", path, 0)

    def _resumed_past(self, path: bytes) -> bool:
        """Whether ``path`` was verified before an interruption (it lies before the cursor, not above it)."""
        if self.resume_key is None:
            return False
        key = path_key(path)
        return key < self.resume_key and self.resume_key[: len(key)] != key

    @property
    def done(self) -> bool:
        return not self._queue and not self._inflight and not self._actions

    @property
    def pending(self) -> int:
        return len(self._queue) + sum(len(v) for v in self._inflight.values()) + len(self._actions)

    def cursor(self) -> bytes:
        """The smallest path not yet verified (b"" when nothing is pending, or at the start)."""
        keys = [k for k, *_ in self._queue[:1]]
        keys += [path_key(p) for items in self._inflight.values() for _, p, _ in items]
        keys += [path_key(a.path) for a in self._actions]
        if not keys:
            return b""
        return b"/".join(min(keys))

    def next_query(self) -> tuple[int, list[tuple[str, bytes]]] | None:
        """The next batch to ask the target about, as ``(req, items)``; None if the queue is empty."""
        items: list[tuple[str, bytes, int]] = []
        hash_bytes = 0
        while self._queue and len(items) < QUERY_ITEMS:
            _key, kind, path, attempts = self._queue[0]
            if kind == "hash" and items and hash_bytes >= QUERY_HASH_BYTES:
                break
            heapq.heappop(self._queue)
            self._queued.discard((kind, path))
            if self._resumed_past(path):
                continue
            items.append((kind, path, attempts))
            if kind == "hash":
                hash_bytes += self._size_hint.pop(path, 0)
        if not items:
            return None
        req = self._next_req
        self._next_req += 1
        self._inflight[req] = items
        return req, [("stat" if k == "entry" else k, p) for k, p, _ in items]

    # -- the primary's side ------------------------------------------------------------

    def primary_view(self, items: list[tuple[str, bytes]]) -> list:
        """The primary's answers to the same items (blocking: run it in a thread)."""
        out: list = []
        for kind, path in items:
            if kind == "list":
                out.append(scan.list_dir(self.root_fd, path))
            elif kind == "stat":
                out.append(scan.stat_path(self.root_fd, path))
            else:
                out.append(scan.file_hashes(self.root_fd, path, self.block_size))
        return out

    # -- what changed meanwhile ----------------------------------------------------------

    def note(self, seq: int, op: Op) -> None:
        """Called for every op journaled while this plan lives (synchronously, from the recorder)."""
        self._log.append((seq, op))
        self._last_seq = seq
        if type(op).__name__ in _STRUCTURAL:
            self._note_moved(op.path, seq)
            if isinstance(op, (RenameOp, LinkOp)):
                self._note_moved(op.src, seq)
        if isinstance(op, LinkOp):
            # The target links them too: a later whole copy of either must take the other along.
            self._stream_links.setdefault(op.src, set()).add(op.path)
            self._stream_links.setdefault(op.path, set()).add(op.src)
        if isinstance(op, (RenameOp, LinkOp)):
            # The destination may now hold a tree not yet verified (or verified under another name).
            self._push("stat", op.path, 0)
            if isinstance(op, RenameOp) and op.flags & 2:  # RENAME_EXCHANGE: both ends moved
                self._push("stat", op.src, 0)

    def _note_moved(self, path: bytes, seq: int) -> None:
        if len(self._moved) >= MAX_MOVED_PATHS:  # bounded memory: older than this counts as moved
            self._moved_floor = max(self._moved.values())
            self._moved.clear()
        self._moved[path] = seq

    def _moved_since(self, path: bytes, seq: int) -> bool:
        """Whether ``path`` or an ancestor was created, removed or moved after ``seq``."""
        if seq < self._moved_floor:
            return True
        parts = path.split(b"/")
        return any(self._moved.get(b"/".join(parts[:i]), -1) > seq for i in range(len(parts) + 1))

    def touches(self, after: int, upto: int) -> Touches:
        """Everything ops ``after < seq <= upto`` touched."""
        t = Touches(upto=upto)
        for seq, op in self._log:
            if seq <= after or seq > upto:
                continue
            name = type(op).__name__
            if name in _STRUCTURAL:
                t.entries.add(op.path)
                if isinstance(op, (RenameOp, LinkOp)):
                    t.entries.add(op.src)
                if name in ("LinkOp", "UnlinkOp", "RenameOp"):
                    t.names_changed = True
            elif isinstance(op, WriteOp):
                t.data.setdefault(op.path, []).append((op.offset, op.offset + len(op.data)))
            elif isinstance(op, TruncateOp):
                t.data.setdefault(op.path, []).append((op.size, 2**63))
                t.meta.add(op.path)
            elif isinstance(op, (SetattrOp, SetxattrOp, RemovexattrOp)):
                t.meta.add(op.path)
        return t

    def forget_before(self, seq: int) -> None:
        """Drop noted ops no comparison in flight can need (all of them are at or after ``seq``)."""
        if self._log and self._log[0][0] <= seq:
            self._log = [(s, op) for s, op in self._log if s > seq]

    # -- comparing ------------------------------------------------------------------------

    def compare(self, req: int, target: list, primary: list, touched: Touches) -> None:
        """Take the target's answers (after P) and the primary's (after P, by N), with the ops of (P, N]."""
        items = self._inflight.pop(req)
        if len(target) != len(items):
            raise ValueError(f"the target answered {len(target)} of {len(items)} items")
        for (kind, path, attempts), t, p in zip(items, target, primary, strict=True):
            if kind == "list":
                self._compare_listing(path, attempts, t, p, touched)
            elif kind in ("stat", "entry"):
                t_info = None if t is None else scan.entry_from_wire(t)
                if touched.entry_touched(path):
                    self._again(kind, path, attempts, is_dir=any(e is not None and stat.S_ISDIR(e.fmt)
                                                                 for e in (p, t_info)))
                elif not self._excluded(path, (p or t_info) is not None and stat.S_ISDIR((p or t_info).fmt)):
                    self._compare_entry(path, p, t_info, attempts, touched, descend=kind == "stat")
            else:
                self._compare_hashes(path, attempts, t, p, touched)

    def _excluded(self, path: bytes, is_dir: bool) -> bool:
        return bool(path) and bool(self.exclude) and self.exclude.excluded(path, is_dir)

    def _again(self, kind: str, path: bytes, attempts: int, *, is_dir: bool = False) -> None:
        """Compare again later; after MAX_ATTEMPTS busy windows (MAX_LIST_ATTEMPTS for a directory or
        its listing), copy it whole; a verify gives up after MAX_VERIFY_ATTEMPTS (``unverified``)."""
        self.stats.rechecks += 1
        if self.verify and attempts + 1 >= MAX_VERIFY_ATTEMPTS:
            if path in self._unverified:  # (its hashes and its entry may each get here)
                return
            self._unverified.add(path)
            self.stats.unverified += 1
            if len(self.unverified_lines) < MAX_DIFFERENCE_LINES:
                what = "its listing" if kind == "list" else "it"
                self.unverified_lines.append(f"{os.fsdecode(path) or '/'}: changed during each of "
                                             f"{attempts + 1} comparisons of {what}: not verified")
            return
        limit = MAX_LIST_ATTEMPTS if kind == "list" or is_dir else MAX_ATTEMPTS
        if attempts + 1 >= limit and not self.verify and kind != "entry":
            self._act(_Action("replace", path))
        else:
            self._push(kind if kind in ("list", "entry") else "stat", path, attempts + 1)

    def _difference(self, path: bytes, what: str) -> None:
        self.stats.differences += 1
        if len(self.lines) < MAX_DIFFERENCE_LINES:
            self.lines.append(f"{os.fsdecode(path) or '/'}: {what}")

    def _act(self, action: _Action) -> None:
        if not self.verify:
            self._actions.append(action)

    def _compare_listing(self, directory: bytes, attempts: int, t: object, p: list[scan.EntryInfo] | None,
                         touched: Touches) -> None:
        if touched.listing_touched(directory):
            self._again("list", directory, attempts)
            return
        if t is None or p is None:
            # Not a directory on one side (any more): the entry itself is compared instead.
            self._push("stat", directory, attempts + 1)
            return
        self.stats.dirs += 1
        if not isinstance(t, list):
            raise ValueError("a listing must be a list")  # noqa: TRY004 (malformed peer data: a ValueError)
        t_entries = {e.name: e for e in map(scan.entry_from_wire, t)}
        p_entries = {e.name: e for e in p}
        for name in sorted(t_entries.keys() | p_entries.keys()):
            path = scan.join(directory, name)
            pe, te = p_entries.get(name), t_entries.get(name)
            is_dir = stat.S_ISDIR((pe or te).fmt)
            if self._excluded(path, is_dir) or self._resumed_past(path):
                continue
            if touched.entry_touched(path):
                self._again("stat", path, 0, is_dir=is_dir)
                continue
            self._compare_entry(path, pe, te, 0, touched)

    def _compare_entry(self, path: bytes, p: scan.EntryInfo | None, t: scan.EntryInfo | None, attempts: int,
                       touched: Touches, *, descend: bool = True) -> None:
        if p is None and t is None:
            return
        if p is None:
            self._difference(path, f"extra on the target ({scan.kind_name(t.fmt)})")
            self._act(_Action("remove", path))
            return
        if t is None:
            self._difference(path, f"missing on the target ({scan.kind_name(p.fmt)})")
            self._replace(path, p, touched.upto)
            return
        diffs = scan.differences(p, t, owners=self.owners)
        if "type" in diffs:
            self._difference(path, f"{scan.kind_name(t.fmt)} on the target, {scan.kind_name(p.fmt)} here"
                             if p.fmt != t.fmt else "symlink target or device differs")
            self._replace(path, p, touched.upto)
            return
        # A hard-linked file's data and metadata ops may be journaled under any of its names.
        shared = p.fmt == stat.S_IFREG and (p.nlink > 1 or t.nlink > 1)
        if shared:
            self._shared.add(path)
            if self._linked(path, p, t, attempts, touched):
                return
        if stat.S_ISDIR(p.fmt) and descend:
            self._push("list", path, 0)
        if p.fmt == stat.S_IFREG and (p.size or t.size or path in touched.data):
            self.stats.bytes_known += p.size
            self._size_hint[path] = max(p.size, t.size)
            self._push("hash", path, attempts)
            diffs = [d for d in diffs if d != "size"]  # decided by the content check
        # Fields an op of the window changed may differ only because the target has not
        # reached that op yet: not a difference, but set them again (a repair is always correct).
        other_data = shared and self._other_name_touched(p.ino, touched.data)
        other_meta = other_data or (shared and self._other_name_touched(p.ino, touched.meta))
        meta_touched = path in touched.meta or other_meta
        data_touched = path in touched.data or other_data
        unsure = (_META_FIELDS if meta_touched else set()) | (_DATA_FIELDS if data_touched else set())
        sure = [d for d in diffs if d not in unsure]
        if sure:
            self._difference(path, "differs in " + ", ".join(sure))
        if sure or unsure:
            if self.verify and not sure and diffs:
                self._again("stat", path, attempts)  # decided when a window is quiet
            else:
                self._act(_Action("meta", path, target_xattrs=tuple(n for n, _ in t.xattrs)))

    def _stale(self, first: tuple[bytes, int | None, int], ino: int) -> bool:
        """Whether the record of an inode's first name no longer holds: that name is another inode
        here now (inode numbers are reused at once), or it was created, removed or moved on the
        target since it was compared."""
        name, tino, seen = first
        if tino is not None and self._moved_since(name, seen):
            return True
        st = scan.lstat(self.root_fd, name)
        return st is None or st.st_ino != ino

    def _other_name_touched(self, ino: int, *touched_paths) -> bool:
        """Whether an op of the window changed a path that is (now) this inode here: a hard-linked
        file's ops are journaled under one of its names, not necessarily the one compared."""
        for paths in touched_paths:
            for other in paths:
                st = scan.lstat(self.root_fd, other)
                if st is not None and st.st_ino == ino:
                    return True
        return False

    def _linked(self, path: bytes, p: scan.EntryInfo, t: scan.EntryInfo, attempts: int, touched: Touches) -> bool:
        """Hard links: True if ``path`` is fully handled as another name of an inode seen before.

        What was recorded of another name holds only while that name is still this inode here and
        has not been created, removed or moved since its comparison (both sides reuse inode numbers
        at once, ``_stale``); otherwise this name is compared as new and replaces the record.
        """
        first = self._links.get(p.ino)
        if first is not None and first[0] != path:  # (the first name itself, compared again: as new)
            first_path, first_tino, _ = first
            if not self._stale(first, p.ino):
                joined = self._joined.get(p.ino, {}).get(path)
                if joined is not None and joined[0] == first_path and not self._moved_since(path, joined[1]):
                    return True  # a repair of this Synchronize linked it to the first name
                if first_tino is None or t.ino != first_tino:
                    self._difference(path, f"not a hard link of {os.fsdecode(first_path)} on the target")
                    self._act(_Action("link", path, src=first_path))
                return True
        claimed = self._target_inodes.get(t.ino)
        if claimed is not None and (claimed[0] == p.ino or self._moved_since(claimed[1], claimed[2])):
            claimed = None
        if claimed is not None or (p.nlink == 1 and t.nlink > 1):
            if claimed is None and touched.names_changed:
                # A link or unlink of another name in the window may not have reached the target.
                self._again("stat", path, attempts)
                return True
            # The target's file is shared with a name the primary does not link: repairing it in
            # place would change the other name too. Give this name a file of its own.
            self._difference(path, "hard-linked on the target to another name")
            self._links[p.ino] = (path, None, touched.upto)
            self._replace(path, p, touched.upto)
            return True
        self._links[p.ino] = (path, t.ino, touched.upto)
        self._target_inodes[t.ino] = (p.ino, path, touched.upto)
        self._on_target.setdefault(p.ino, path)
        return False

    def _replace(self, path: bytes, p: scan.EntryInfo, seen: int) -> None:
        if p.fmt == stat.S_IFREG and p.nlink > 1:
            first = self._links.get(p.ino)
            if first is not None and first[0] != path and not self._stale(first, p.ino):
                self._act(_Action("link", path, src=first[0]))
                return
            self._links[p.ino] = (path, None, seen)
        if p.fmt == stat.S_IFREG:
            self.stats.bytes_known += p.size
        self._act(_Action("replace", path))

    def _compare_hashes(self, path: bytes, attempts: int, t: object, p: tuple[int, int, bytes] | None,
                        touched: Touches) -> None:
        if (touched.entry_touched(path) or t is None or p is None
                or (path in self._shared and self._other_name_touched(p[1], touched.data))):
            # (a hard-linked file may have been written under another name: which blocks is unknown)
            self._again("stat", path, attempts)
            return
        if not (isinstance(t, list) and len(t) == 3 and type(t[0]) is int and isinstance(t[2], bytes)):
            raise ValueError("a hash answer must be [size, inode, digests]")
        t_size, t_digests = t[0], t[2]
        p_size, _, p_digests = p
        self.stats.files += 1
        self.stats.bytes_compared += p_size
        d = scan.DIGEST_BYTES
        bs = self.block_size
        n = max(len(p_digests), len(t_digests)) // d
        differing = [i for i in range(n) if p_digests[i * d:(i + 1) * d] != t_digests[i * d:(i + 1) * d]]
        written = set()
        for start, end in touched.data.get(path, ()):
            last = min(end, max(p_size, t_size) + bs)
            written.update(range(start // bs, (last + bs - 1) // bs))
        content_differs = bool(set(differing) - written) or (t_size != p_size and path not in touched.data)
        if content_differs:
            self._difference(path, f"content differs ({len(differing)} of {n} blocks"
                             + (f", size {t_size} on the target, {p_size} here)" if t_size != p_size else ")"))
        if self.verify:
            if written:
                self._again("stat", path, attempts)
            return
        blocks = sorted({i for i in differing if i * bs < p_size} | {i for i in written if i * bs < p_size})
        if blocks or t_size != p_size or written:
            self._act(_Action("blocks", path, blocks=deque(blocks)))

    # -- repairs -----------------------------------------------------------------------

    @property
    def has_repairs(self) -> bool:
        return bool(self._actions)

    def produce(self, budget: int) -> list[Op]:
        """Repair ops for the next actions, read from the backing dir *now*.

        The caller holds changes off while it calls this and sends the ops right after
        the last journal record, so they describe the primary at exactly that point.
        At most about ``budget`` bytes of file data per call.
        """
        out: list[Op] = []
        used = 0
        while self._actions and used < budget:
            action = self._actions[0]
            start = len(out)
            spent, finished = self._produce_one(action, out, budget - used)
            for op in out[start:]:  # a repaired name may be another inode on the target now
                if type(op).__name__ in _STRUCTURAL:
                    self._note_moved(op.path, self._last_seq + 1)
            used += spent
            if finished:
                self._actions.popleft()
        self.stats.repairs += len(out)
        self.stats.repair_bytes += used
        return out

    def _produce_one(self, action: _Action, out: list[Op], budget: int) -> tuple[int, bool]:
        """Append ops for ``action``; return (file bytes used, whether the action is finished)."""
        path = action.path
        st = scan.lstat(self.root_fd, path)
        if action.kind == "remove":
            if st is None:
                out.append(RemoveTreeOp(path))
            else:
                self._push("stat", path, action.attempts + 1)
            return 0, True
        if action.kind == "link":
            src_st = scan.lstat(self.root_fd, action.src)
            if st is not None and src_st is not None and st.st_ino == src_st.st_ino and action.src != path:
                out.append(RemoveTreeOp(path))
                out.append(LinkOp(action.src, path))
                self._join(st.st_ino, path, action.src)
            else:
                self._push("stat", path, action.attempts + 1)
            return 0, True
        if st is None:
            if path:
                out.append(RemoveTreeOp(path))  # gone meanwhile (the stream removed it on the target too)
            return 0, True
        if action.kind == "meta":
            out.extend(self._meta_ops(path, st, action.target_xattrs))
            return 0, True
        if action.kind == "replace":
            if not (stat.S_ISREG(st.st_mode) and st.st_nlink > 1):
                return 0, self._replace_ops(action, st, out)
            if self._link_instead(path, st, out):
                return 0, True
            finished = self._replace_ops(action, st, out)
            self._relink_stream_names(path, st, out)
            return 0, finished
        # blocks
        if not stat.S_ISREG(st.st_mode):
            self._push("stat", path, action.attempts + 1)
            return 0, True
        used = self._block_ops(action, out, budget)
        if action.blocks:
            return used, False
        out.append(TruncateOp(path, st.st_size, st.st_mtime_ns))
        out += self._meta_ops(path, st, action.target_xattrs)
        return used, True

    def _link_instead(self, path: bytes, st: os.stat_result, out: list[Op]) -> bool:
        """A whole copy of a file that has other names now (it may have been linked since it was compared).

        A copy is a new inode on the target, so it must not split the names apart: if the target
        has another name of this inode already (compared there, or copied by an earlier repair),
        this one becomes a link of it (True); else this name is copied (False) and is the one the
        others are linked to (when they are compared, or when their own copy is produced). Only
        names the target has count: a name merely decided on may not have been produced yet.
        """
        first = self._on_target.get(st.st_ino)
        if first is not None and first != path:
            other = scan.lstat(self.root_fd, first)
            if other is not None and other.st_ino == st.st_ino:
                out.append(RemoveTreeOp(path))
                out.append(LinkOp(first, path))
                self._join(st.st_ino, path, first)
                return True
        self._on_target[st.st_ino] = path
        self._links[st.st_ino] = (path, None, self._last_seq)
        return False

    def _join(self, ino: int, name: bytes, src: bytes) -> None:
        """``name`` was just linked, on the target, to ``src`` (a name of ``ino``) by a repair being
        produced: compared later while ``src`` is the first name on record, it is that name's link
        unless it has moved since (the repair marks it moved at the next seq, hence that seq)."""
        self._joined.setdefault(ino, {})[name] = (src, self._last_seq + 1)

    def _relink_stream_names(self, path: bytes, st: os.stat_result, out: list[Op]) -> None:
        """After a whole copy of ``path`` (a new inode on the target): link to it the names that the
        stream linked with it during this Synchronize and that are still this inode here.

        On the target those names share the inode the copy just replaced; a name compared before
        the link existed (when it had one name) is in no other record, so without this the copy
        would split it off. Names known otherwise are joined when they are compared.
        """
        seen = {path}
        todo = [path]
        while todo:
            for name in sorted(self._stream_links.get(todo.pop(), ())):
                if name in seen:
                    continue
                seen.add(name)
                todo.append(name)  # through names moved or removed since: a chain of links
                other = scan.lstat(self.root_fd, name)
                if other is not None and other.st_ino == st.st_ino:
                    out.append(RemoveTreeOp(name))
                    out.append(LinkOp(path, name))
                    self._join(st.st_ino, name, path)

    def _xattrs(self, path: bytes) -> tuple[tuple[bytes, bytes], ...]:
        info = scan.stat_path(self.root_fd, path)
        return info.xattrs if info is not None else ()

    def _meta_ops(self, path: bytes, st: os.stat_result, target_xattrs: tuple[bytes, ...]) -> list[Op]:
        is_link = stat.S_ISLNK(st.st_mode)
        is_dir = stat.S_ISDIR(st.st_mode)
        ops: list[Op] = [SetattrOp(path, None if is_link else stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None,
                                   None if is_dir else st.st_mtime_ns)]
        current = dict(self._xattrs(path))
        ops += [RemovexattrOp(path, n) for n in target_xattrs if n not in current]
        ops += [SetxattrOp(path, n, v) for n, v in sorted(current.items())]
        return ops

    def _replace_ops(self, action: _Action, st: os.stat_result, out: list[Op]) -> bool:
        """Recreate ``action.path`` from scratch; a regular file's data follows as blocks (returns False then)."""
        path = action.path
        mode = stat.S_IMODE(st.st_mode)
        fmt = stat.S_IFMT(st.st_mode)
        xattrs = self._xattrs(path)
        if fmt == stat.S_IFDIR:
            if path:
                out.append(RemoveTreeOp(path))
                out.append(MkdirOp(path, mode, st.st_uid, st.st_gid, st.st_mtime_ns))
            else:
                out.append(SetattrOp(path, mode, st.st_uid, st.st_gid))
            out += [SetxattrOp(path, n, v) for n, v in xattrs]
            self._push("list", path, 0)
            return True
        out.append(RemoveTreeOp(path))
        if fmt == stat.S_IFLNK:
            target = scan.readlink(self.root_fd, path)
            if target is None:  # cannot happen while changes are held off
                return True
            out.append(SymlinkOp(path, target, st.st_uid, st.st_gid, st.st_mtime_ns))
            out += [SetxattrOp(path, n, v) for n, v in xattrs]
            return True
        if fmt != stat.S_IFREG:
            out.append(MknodOp(path, st.st_mode, st.st_rdev, st.st_uid, st.st_gid, st.st_mtime_ns))
            out += [SetxattrOp(path, n, v) for n, v in xattrs]
            return True
        out.append(CreateOp(path, mode, st.st_uid, st.st_gid, st.st_mtime_ns))
        out.append(TruncateOp(path, st.st_size, st.st_mtime_ns))
        out += [SetxattrOp(path, n, v) for n, v in xattrs]
        # The data follows as blocks (over as many repair steps as it takes); all-zero blocks
        # are skipped, since the truncate already made them zero (sparse files stay cheap).
        action.kind = "blocks"
        action.fresh = True
        action.blocks = deque(range((st.st_size + self.block_size - 1) // self.block_size))
        return False

    def _block_ops(self, action: _Action, out: list[Op], budget: int) -> int:
        fd = scan.open_regular(self.root_fd, action.path)
        if fd is None:
            action.blocks.clear()
            return 0
        used = 0
        bs = self.block_size
        try:
            mtime_ns = os.fstat(fd).st_mtime_ns
            while action.blocks and used < budget:
                i = action.blocks.popleft()
                data = os.pread(fd, bs, i * bs)
                if not data or (action.fresh and data.count(0) == len(data)):
                    continue
                out.append(WriteOp(action.path, i * bs, data, mtime_ns))
                used += len(data)
        finally:
            os.close(fd)
        return used
