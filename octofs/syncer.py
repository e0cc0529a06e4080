"""syncer.py: owns running one Synchronize of one target over the shipper's connection (trio side of syncplan.py).

A ``SyncJob`` is what was asked for (a full Synchronize, a verify-only pass, or a
Synchronize of some paths) and what it found; ``drive`` runs it on a live
connection through the small ``SyncLink`` interface the shipper provides:

- queries go into the stream at a known position (after record P);
- repairs are produced while changes are held off (``Recorder.pause``), once the
  shipper has sent every journaled record, and go right after the last one;
- checkpoints let the target persist how far the walk has come, so that an
  interrupted Synchronize resumes from there (docs/FORMAT.md §7.6).

Invariants: see syncplan.py (repairs are state-setting; skipping needs a quiet
window). The recorder listener that feeds ``SyncPlan.note`` is attached for the
whole life of the job, before its first query.

Cancellation: ``drive`` may be cancelled at any await (the connection dropped); the
job stays pending and a later connection resumes it (from the target's checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from octofs import protocol
from octofs.exclude import ExcludeFilter
from octofs.ops import Op, op_paths
from octofs.recorder import Recorder
from octofs.syncplan import SyncPlan

log = logging.getLogger(__name__)

REPAIR_BUDGET_BYTES = 4 * 2**20
REPAIR_RETRY_S = 0.1
CHECKPOINT_EVERY_S = 2.0
CHECKPOINT_EVERY_STEPS = 16  # queries and repair frames


class SyncLink(Protocol):
    """What a job needs of a connection (the shipper implements it)."""

    owners: bool

    async def query(self, req: int, block_size: int, items: list[tuple[str, bytes]]) -> tuple[int, protocol.SyncAnswer]:
        """Send a SyncQuery; return (the seq it followed in the stream, the answer)."""

    async def repair(self, produce) -> int | None:
        """Hold changes, wait until every journaled record is sent, call ``produce(seq)`` for the ops, send them;
        return the frame's size, or None if the stream did not catch up in time (nothing was produced)."""

    async def send(self, msg: protocol.Message) -> int:
        """Send a frame in stream order; return the seq it followed."""

    async def wait_sent(self, seq: int) -> None:
        """Return once every record up to ``seq`` has been sent on this connection."""

    async def fence(self) -> tuple[bytes, ...]:
        """Return once the target has handled everything sent so far (an empty query), with the
        paths of the ops it skipped since its last answer."""


@dataclass
class SyncJob:
    """One requested Synchronize or verify-only pass of one target."""

    target: str
    verify: bool = False
    reason: str = "requested"
    paths: list[bytes] | None = None  # None: the whole vault
    reset: bool = False  # the target must take a new position (it missed dropped ops)
    trivial: bool = False  # nothing to compare: the target streamed the vault from its empty start
    sync_id: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    state: str = "pending"  # pending | running | done | failed
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    checkpoint_seq: int = 0
    resume: dict | None = None  # the target's {"cursor", "seq"} when resuming
    plan: SyncPlan | None = None
    done: trio.Event = field(default_factory=trio.Event)
    lines: list[str] = field(default_factory=list)
    unverified_lines: list[str] = field(default_factory=list)
    differences: int = 0

    # -- persistence (primary state dir: targets/NAME.sync) ----------------------------

    def to_json(self) -> bytes:
        return json.dumps({
            "id": self.sync_id.hex(), "reason": self.reason, "reset": self.reset,
            "paths": None if self.paths is None else [p.hex() for p in self.paths],
        }).encode() + b"\n"

    @classmethod
    def from_json(cls, target: str, data: bytes) -> SyncJob:
        d = json.loads(data)
        return cls(target=target, reason=d.get("reason", "requested"), reset=bool(d.get("reset")),
                   paths=None if d.get("paths") is None else [bytes.fromhex(p) for p in d["paths"]],
                   sync_id=bytes.fromhex(d["id"]))

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict:
        s = self.plan.stats if self.plan is not None else None
        now = time.time()
        elapsed = ((self.finished or now) - self.started) if self.started else 0.0
        out = {
            "id": self.sync_id.hex(),
            "kind": "verify" if self.verify else "sync",
            "reason": self.reason,
            "state": self.state,
            "paths": None if self.paths is None else [os.fsdecode(p) for p in self.paths],
            "elapsed_s": round(elapsed, 3),
            "error": self.error,
        }
        if s is not None:
            rate = s.bytes_compared / elapsed if elapsed > 0 else 0.0
            remaining = max(0, s.bytes_known - s.bytes_compared)
            out.update({
                "dirs": s.dirs, "files": s.files, "bytes_compared": s.bytes_compared, "bytes_known": s.bytes_known,
                "repair_bytes": s.repair_bytes, "repairs": s.repairs, "differences": s.differences,
                "rechecks": s.rechecks, "unverified": s.unverified, "pending": self.plan.pending,
                "rate_bps": round(rate), "eta_s": round(remaining / rate, 1) if rate > 0 else None,
            })
        if self.verify and self.state == "done":
            out["lines"] = self.lines
            out["unverified_lines"] = self.unverified_lines
        return out


def pending_path(state_dir: Path, target: str) -> Path:
    return state_dir / "targets" / f"{target}.sync"


def load_pending(state_dir: Path, target: str) -> SyncJob | None:
    """The Synchronize recorded as pending for ``target``, if any (a damaged record counts as a full one)."""
    path = pending_path(state_dir, target)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return SyncJob.from_json(target, data)
    except (ValueError, KeyError, TypeError):
        log.warning("pending Synchronize record %s is damaged: a full Synchronize is started instead", path)
        return SyncJob(target=target, reason="a pending Synchronize (its record was damaged)")


def save_pending(state_dir: Path, job: SyncJob) -> None:
    path = pending_path(state_dir, job.target)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(job.to_json())
    os.replace(tmp, path)


def clear_pending(state_dir: Path, job: SyncJob) -> None:
    current = load_pending(state_dir, job.target)
    if current is not None and current.sync_id == job.sync_id:
        pending_path(state_dir, job.target).unlink(missing_ok=True)


# -- running ----------------------------------------------------------------------------------


async def drive(job: SyncJob, link: SyncLink, *, recorder: Recorder, backing_fd: int, exclude: ExcludeFilter,
                journal_ops=None) -> None:
    """Run ``job`` to its end on ``link``. Raises whatever the connection raises (the job stays resumable).

    Args:
        journal_ops: for a resumed job, a callable(after_seq) returning the journaled (seq, op) after
            ``after_seq``, or None if the journal no longer holds them (then the walk restarts).
    """
    job.state = "running"
    job.started = job.started or time.time()
    cursor = None
    replay: list[tuple[int, Op]] = []
    if job.resume is not None and not job.verify:
        cursor = bytes.fromhex(job.resume.get("cursor", ""))
        replay_from = int(job.resume.get("seq", 0))
        got = journal_ops(replay_from) if journal_ops is not None else None
        if got is None:
            log.warning("target %s: Synchronize %s restarts from the beginning (the journal no longer holds "
                        "the ops since its checkpoint)", job.target, job.sync_id.hex()[:8])
            cursor = None
        else:
            replay = got
    plan = SyncPlan(backing_fd, owners=link.owners, exclude=exclude, verify=job.verify,
                    paths=[] if job.trivial else job.paths, cursor=cursor)
    job.plan = plan
    for seq, op in replay:  # what changed since the checkpoint is compared again
        plan.note(seq, op)
        for p in op_paths(op):
            plan.recheck(p)
    recorder.listeners.append(plan.note)
    try:
        # Every comparison window must be covered by the noted ops: first let the stream catch up
        # with what was journaled before the listener was attached.
        await link.wait_sent(recorder.writer.last_seq)
        if job.resume is None or job.verify:
            job.checkpoint_seq = await link.send(protocol.SyncBegin(job.sync_id, 0, job.verify))
        else:
            log.info("target %s: resuming Synchronize %s after %s", job.target, job.sync_id.hex()[:8],
                     os.fsdecode(cursor or b"") or "the start")
        last_checkpoint = trio.current_time()
        last_cursor = b""
        steps = 0
        while True:
            steps += 1
            now = trio.current_time()
            if not job.verify and (now - last_checkpoint >= CHECKPOINT_EVERY_S or steps >= CHECKPOINT_EVERY_STEPS):
                cur = plan.cursor()
                if cur != last_cursor:
                    job.checkpoint_seq = await link.send(protocol.SyncCheckpoint(job.sync_id, cur))
                    last_cursor = cur
                last_checkpoint, steps = now, 0
            if plan.has_repairs:
                if await link.repair(lambda seq: plan.produce(REPAIR_BUDGET_BYTES)) is None:
                    await trio.sleep(REPAIR_RETRY_S)  # the stream is behind: let changes through meanwhile
                continue
            query = plan.next_query()
            if query is None:
                # Nothing left to compare. The target may have skipped ops on paths not repaired
                # yet (its answers list them): ask once more, and compare those.
                for path in await link.fence():
                    plan.recheck(path)
                if plan.done:
                    break
                continue
            req, items = query
            async with trio.open_nursery() as nursery:
                result: dict = {}

                async def ask() -> None:
                    result["pos"], result["answer"] = await link.query(req, plan.block_size, items)

                nursery.start_soon(ask)
                primary = await trio.to_thread.run_sync(plan.primary_view, items)
            pos, answer = result["pos"], result["answer"]
            upto = recorder.writer.last_seq
            plan.compare(req, list(answer.results), primary, plan.touches(min(pos, answer.seq), upto))
            for path in answer.skipped:
                plan.recheck(path)
            plan.forget_before(min(pos, answer.seq))  # later queries sit after this one in the stream
        await link.send(protocol.SyncEnd(job.sync_id, plan.stats.differences))
        await link.fence()
    finally:
        recorder.listeners.remove(plan.note)
    job.differences = plan.stats.differences
    job.lines = plan.lines
    job.unverified_lines = plan.unverified_lines
    job.state = "done"
    job.finished = time.time()
    job.done.set()
    s = plan.stats
    log.info("target %s: %s %s done in %.2f s: %d dir(s), %d file(s), %d bytes compared, %d difference(s), "
             "%d repair op(s) with %d bytes of data", job.target, "verify" if job.verify else "Synchronize",
             job.sync_id.hex()[:8], job.finished - job.started, s.dirs, s.files, s.bytes_compared, s.differences,
             s.repairs, s.repair_bytes)
