"""failover.py: owns failure detection and takeover on a target (Automatic Switch Over).

For each vault listed under ``failover:`` in SERVE.yaml, ``watch`` runs inside
``octofs serve`` (docs/ARCHITECTURE.md, Failover):

1. *Heartbeats.* The primary's shipper sends a Heartbeat every ``heartbeat``; the
   replayer notes when it last heard one. Silence for 1.5 intervals starts step 2.
2. *Direct query.* A health probe (health.py, UDP, authenticated) to the primary's
   mount daemon over a separate path. An answer "primary" means the primary lives
   (only the replication link is down): nothing happens.
3. *Majority.* With a ``witness``, it is asked whether *it* sees the primary. Only if
   it answers "no" do target and witness (two of three) agree that the primary is gone;
   a silent witness means no majority and no takeover.
4. *Takeover* (``take_over``): the replayer releases the vault (the epoch is raised and
   persisted first, the primary's connection is ended with an ``epoch`` Error, the
   replica is made durable and closed); a state dir is prepared whose journal
   continues after the replica's durable seq, with the vault's identity and the new
   epoch; the replica dir is mounted with ``octofs mount`` as the live vault; the
   hooks run in order with the vault's details in their environment. Every step's
   outcome is in ``takeover.json`` beside the replica (``octofs status --root``) and the log.

Invariants:
- A replica that is not a state the primary had (needs a resync, or a Synchronize is
  under way) is never taken over: status says why, and the watch goes on.
- The epoch is durable before the vault is released, so a stale primary is refused
  from then on, also after a restart of ``octofs serve``.
- The takeover record is persisted before the mount, so a restarted ``octofs serve``
  never reopens (and feeds) a replica dir that a mount owns.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from octofs import apply, health, paths, state
from octofs.control import ControlRequestError
from octofs.replayer import TargetServer
from octofs.replica import Replica, vault_state_dir
from octofs.segment import header_bytes

log = logging.getLogger(__name__)

SILENCE_INTERVALS = 1.5  # heartbeats may arrive a little late: silence for this many intervals is "missed"
PROBE_TRIES = 3
MOUNT_TIMEOUT_S = 60.0
OUTPUT_TAIL_CHARS = 2000


def probe_timeout(heartbeat_s: float) -> float:
    """How long one health probe waits for its answer."""
    return min(1.0, heartbeat_s / 2)


def detection_bound(heartbeat_s: float, witness: bool) -> float:
    """The longest a dead primary goes unnoticed: silence, then the probes (and the witness's)."""
    probes = PROBE_TRIES * probe_timeout(heartbeat_s)
    return SILENCE_INTERVALS * heartbeat_s + probes + (2 * probes if witness else 0)


def takeover_path(root: Path, vault: str) -> Path:
    return vault_state_dir(root, vault) / "takeover.json"


def primary_state_dir(root: Path, vault: str) -> Path:
    """The new primary's state dir after a takeover (beside the replica, never inside it)."""
    return vault_state_dir(root, vault) / "primary"


def load_record(root: Path, vault: str) -> dict | None:
    try:
        record = json.loads(takeover_path(root, vault).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class Watch:
    """One vault's failover settings (from SERVE.yaml, as plain values)."""

    vault: str
    heartbeat_s: float
    primary: tuple[str, int]
    witness: tuple[str, int] | None
    mount: Path
    hooks: tuple[str, ...]
    hook_timeout_s: float
    health: tuple[str, int] | None
    targets: tuple[tuple[str, str, int], ...]


class Watcher:
    """Watches one vault's primary and takes over when it is gone (see the module docstring)."""

    def __init__(self, server: TargetServer, watch: Watch, secret: bytes, secret_file: Path) -> None:
        self.server = server
        self.w = watch
        self.secret = secret
        self.secret_file = secret_file
        self.root = server.root
        self.state = "watching"
        self.detail: str | None = None
        self.path_checked = False  # the direct query was tried once while the primary was alive
        self.record: dict | None = load_record(self.root, watch.vault)
        self._publish()

    def _publish(self) -> None:
        w = self.w
        info = {
            "failover": {
                "state": self.state,
                "detail": self.detail,
                "heartbeat_s": w.heartbeat_s,
                "detection_bound_s": round(detection_bound(w.heartbeat_s, w.witness is not None), 3),
                "primary": health.format_address(*w.primary),
                "witness": health.format_address(*w.witness) if w.witness else None,
                "mount": str(w.mount),
            },
        }
        if self.record is not None:
            info["takeover"] = self.record
            info["role"] = "primary"
            info["epoch"] = self.record.get("epoch")
        else:
            info["role"] = "target"
        self.server.status_extra[w.vault] = info

    def _set(self, new_state: str, detail: str | None = None) -> None:
        if (new_state, detail) != (self.state, self.detail):
            level = logging.INFO if new_state in ("watching", "primary") else logging.WARNING
            log.log(level, "vault %s failover: %s%s", self.w.vault, new_state, f": {detail}" if detail else "")
        self.state, self.detail = new_state, detail
        self._publish()

    # -- detection ----------------------------------------------------------

    async def run(self) -> None:
        """Watch until a takeover happened (then return), or until cancelled."""
        w = self.w
        if self.record is not None:
            self._set("primary", f"taken over at epoch {self.record.get('epoch')}")
            return
        start = trio.current_time()
        silence_s = SILENCE_INTERVALS * w.heartbeat_s
        timeout_s = probe_timeout(w.heartbeat_s)
        while self.record is None:  # a planned handover (``handover``) may take over meanwhile
            if self.server.stopped_cleanly(w.vault):
                # An unmount is not a failure: no takeover until the primary is back (and then dies).
                if self.state != "primary stopped":
                    self._set("primary stopped", "the primary unmounted cleanly: no takeover until it returns")
                await trio.sleep(w.heartbeat_s)
                start = trio.current_time()
                continue
            last = self.server.heard(w.vault) or start
            now = trio.current_time()
            if now < last + silence_s:
                if self.state != "watching":
                    self._set("watching")
                if self.server.heard(w.vault) is not None and not self.path_checked:
                    # The primary is alive: check once that the direct query works, or a mere break
                    # of the replication link would look like a dead primary.
                    self.path_checked = True
                    checked = await health.probe(w.primary, w.vault, self.secret, timeout_s=timeout_s,
                                                 tries=PROBE_TRIES)
                    if checked is None:
                        self._set("watching", f"WARNING: the primary's health responder "
                                  f"{health.format_address(*w.primary)} does not answer although the primary "
                                  "is alive (vault.yaml failover.health, secret): any break of the replication "
                                  "link would be taken for a dead primary")
                    continue
                await trio.sleep(last + silence_s - now)
                continue
            self._set("querying", f"no heartbeat for {now - last:.2f} s; asking the primary directly")
            alive = await health.probe(w.primary, w.vault, self.secret, timeout_s=timeout_s, tries=PROBE_TRIES)
            if (self.server.heard(w.vault) or start) > last or self.record is not None:
                continue  # heartbeats resumed meanwhile (or a planned handover happened)
            if alive is not None and alive.role == "primary":
                self._set("primary answers", f"the replication link is silent, but the primary answers the "
                          f"direct query (epoch {alive.epoch}, seq {alive.seq}): no takeover")
                await trio.sleep(w.heartbeat_s)
                continue
            if w.witness is not None:
                seen = await health.ask_witness(w.witness, w.primary, w.vault, self.secret, timeout_s=timeout_s,
                                                tries=PROBE_TRIES)
                if (self.server.heard(w.vault) or start) > last:
                    continue
                if seen is None:
                    self._set("no majority", f"the primary does not answer, and neither does the witness "
                              f"{health.format_address(*w.witness)}: no takeover")
                    await trio.sleep(w.heartbeat_s)
                    continue
                if seen.seen:
                    self._set("witness sees the primary", "the primary does not answer here but answers the "
                              "witness (a partition between it and this target): no takeover")
                    await trio.sleep(w.heartbeat_s)
                    continue
            if self.record is not None:
                break
            replica = self.server.replica(w.vault)
            why_not = _why_not(replica)
            if why_not is not None:
                self._set("cannot take over", why_not)
                await trio.sleep(w.heartbeat_s)
                continue
            detection_s = trio.current_time() - last
            reason = (f"no heartbeat for {detection_s:.2f} s, no answer to the direct query"
                      + (", and the witness does not see the primary either" if w.witness else ""))
            try:
                await self.take_over(reason, detection_s)
            except ValueError as exc:  # released meanwhile, or not consistent any more
                self._set("cannot take over", str(exc))
                await trio.sleep(w.heartbeat_s)
                continue
            return

    # -- takeover -----------------------------------------------------------

    async def handover(self, epoch: object, seq: object) -> dict:
        """A planned switch (``octofs failover`` on the primary): take over now if the replica holds
        exactly what the drained primary journaled (``seq`` of ``epoch``). Idempotent for a retried request."""
        if type(epoch) is not int or type(seq) is not int:
            return {"accepted": False, "reason": "bad epoch or seq"}
        if self.record is not None:
            if self.record.get("planned") == [epoch, seq]:
                return {"accepted": self.record.get("state") == "primary", "epoch": self.record["epoch"],
                        "reason": f"taken over: {self.record.get('state')}"}
            return {"accepted": False, "reason": f"already taken over at epoch {self.record.get('epoch')}"}
        replica = self.server.replica(self.w.vault)
        why_not = _why_not(replica)
        if why_not is None and replica is not None:
            if replica.epoch != epoch:
                why_not = f"the replica is at epoch {replica.epoch}, the primary asks at epoch {epoch}"
            elif replica.durable_seq != seq:
                why_not = f"the replica is durable at seq {replica.durable_seq}, not at the primary's {seq}: not synced"
        if why_not is not None:
            log.warning("vault %s: planned handover refused: %s", self.w.vault, why_not)
            return {"accepted": False, "reason": why_not}
        try:
            record = await self.take_over(f"planned handover from the primary at epoch {epoch}, seq {seq}", 0.0,
                                          planned=[epoch, seq])
        except ValueError as exc:
            return {"accepted": False, "reason": str(exc)}
        return {"accepted": record["state"] == "primary", "epoch": record["epoch"],
                "reason": f"taken over: {record['state']}"}

    async def reclaim(self, epoch: object, seq: object) -> dict:
        """The way back: the new primary this target became has handed the vault over (``failback``) at
        ``seq``, and another machine is the primary at ``epoch`` now. The replica dir (the mount's backing
        dir, every op up to ``seq`` in it) becomes a replica again at that seq, so the new primary resumes
        streaming here without a Synchronize."""
        w = self.w
        if type(epoch) is not int or type(seq) is not int:
            raise ValueError("bad epoch or seq")
        if self.record is None:
            raise ValueError(f"vault {w.vault} was not taken over here")
        record = self.record
        await trio.to_thread.run_sync(_reclaim_files, self.root, w.vault, epoch, seq, record)
        self.server.unrelease(w.vault)
        self.record = None
        self._set("handed back", f"a replica again at seq {seq}; the primary is at epoch {epoch} now")
        log.warning("vault %s: handed back at seq %d; this target receives it again (epoch %d)", w.vault, seq, epoch)
        return {"vault": w.vault, "seq": seq, "epoch": epoch}

    async def take_over(self, reason: str, detection_s: float, planned: list | None = None) -> dict:
        """Release the replica, mount it as the new primary, run the hooks (see the module docstring)."""
        w = self.w
        self._set("taking over", reason)
        replica, epoch = await self.server.release(w.vault, reason)
        record = {
            "epoch": epoch,
            "released": True,
            "at": time.time(),
            "reason": reason,
            "detection_s": round(detection_s, 3),
            "seq": replica.durable_seq,
            "mountpoint": str(w.mount),
            "state_dir": str(primary_state_dir(self.root, w.vault)),
            "state": "mounting",
            "mount": None,
            "hooks": [],
            "planned": planned,
        }
        self.record = record
        await trio.to_thread.run_sync(self._save)
        log.warning("vault %s: TAKING OVER as primary at epoch %d (replica durable at seq %d) after %.2f s: %s",
                    w.vault, epoch, replica.durable_seq, detection_s, reason)
        yaml_path = await trio.to_thread.run_sync(self._prepare, replica, epoch)
        record["mount"] = await self._mount(yaml_path)
        await trio.to_thread.run_sync(self._save)
        env = {**os.environ, "OCTOFS_VAULT": w.vault, "OCTOFS_EPOCH": str(epoch), "OCTOFS_MOUNTPOINT": str(w.mount),
               "OCTOFS_REPLICA_DIR": str(replica.replica_dir), "OCTOFS_ROOT": str(self.root),
               "OCTOFS_STATE_DIR": record["state_dir"], "OCTOFS_SEQ": str(replica.durable_seq),
               "OCTOFS_OLD_PRIMARY": health.format_address(*w.primary)}
        if record["mount"]["rc"] == 0:
            for hook in w.hooks:
                record["hooks"].append(await self._run_hook(hook, env))
                self._publish()
                await trio.to_thread.run_sync(self._save)
        failed = record["mount"]["rc"] != 0 or any(h["rc"] != 0 for h in record["hooks"])
        record["state"] = "failed" if failed else "primary"
        record["done_at"] = time.time()
        await trio.to_thread.run_sync(self._save)
        self._set("primary" if not failed else "takeover failed",
                  f"took over at epoch {epoch}" + (" (see the takeover record)" if failed else ""))
        return record

    def _save(self) -> None:
        assert self.record is not None
        state.write_atomic(takeover_path(self.root, self.w.vault), json.dumps(self.record, indent=1).encode(), 0o600)
        self._publish()

    def _prepare(self, replica: Replica, epoch: int) -> Path:
        """The new primary's state dir and vault.yaml; its journal continues after the durable seq."""
        w = self.w
        sdir = primary_state_dir(self.root, w.vault)
        if sdir.exists():  # from an earlier takeover of this vault: keep it aside, never mix journals
            shutil.move(str(sdir), str(sdir.with_name(f"primary.before-epoch-{epoch}")))
        state.ensure_state_dir(sdir)
        assert replica.vault_id is not None
        state.write_atomic(paths.vault_id_path(sdir), replica.vault_id.hex().encode() + b"\n")
        state.write_atomic(paths.epoch_path(sdir), f"{epoch}\n".encode())
        state.write_atomic(sdir / "origin", b"existing\n")  # every new target gets a Synchronize
        jdir = paths.journal_dir(sdir)
        jdir.mkdir(mode=0o700)
        first = replica.durable_seq + 1
        state.write_atomic(paths.segment_path(jdir, first), header_bytes(replica.vault_id, epoch, first), 0o600)
        w.mount.mkdir(parents=True, exist_ok=True)
        failover = {"heartbeat": f"{w.heartbeat_s:g}"}
        if w.health is not None:
            failover["health"] = health.format_address(*w.health)
        doc = {
            "vault": w.vault,
            "backing": str(replica.replica_dir),
            "state_dir": str(sdir),
            "secret_file": str(self.secret_file),
            "failover": failover,
            "targets": [{"name": name, "address": f"{host}:{port}"} for name, host, port in w.targets],
        }
        path = vault_state_dir(self.root, w.vault) / "primary.yaml"
        # JSON is YAML: config.py stays the only module that reads YAML.
        state.write_atomic(path, json.dumps(doc, indent=1).encode() + b"\n", 0o600)
        return path

    async def _mount(self, yaml_path: Path) -> dict:
        cmd = [sys.executable, "-m", "octofs", "mount", str(yaml_path), str(self.w.mount)]
        started = trio.current_time()
        with trio.move_on_after(MOUNT_TIMEOUT_S):
            proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False,
                                          stdin=b"")
            out = (proc.stdout + proc.stderr).decode(errors="replace")[-OUTPUT_TAIL_CHARS:]
            result = {"rc": proc.returncode, "duration_s": round(trio.current_time() - started, 3), "output": out}
            if proc.returncode == 0:
                log.warning("vault %s mounted on %s as the new primary", self.w.vault, self.w.mount)
            else:
                log.error("vault %s: the takeover mount failed (exit %d): %s", self.w.vault, proc.returncode,
                          out.strip())
            return result
        log.error("vault %s: the takeover mount did not finish within %g s", self.w.vault, MOUNT_TIMEOUT_S)
        return {"rc": -1, "duration_s": MOUNT_TIMEOUT_S, "output": "timed out"}

    async def _run_hook(self, hook: str, env: dict) -> dict:
        """Run one hook with ``/bin/sh -c``; its output goes to ``hooks.log`` beside the replica."""
        log_path = vault_state_dir(self.root, self.w.vault) / "hooks.log"
        started = trio.current_time()
        with open(log_path, "ab") as out:  # noqa: ASYNC230 - a small local log file; the hook needs a real fd
            offset = out.tell()
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {hook}\n".encode())
            out.flush()
            rc: int | None = None
            with trio.move_on_after(self.w.hook_timeout_s):
                # Output to a file, not a pipe: a hook that starts a service in the background
                # must not keep us waiting for its pipe to close.
                proc = await trio.run_process(["/bin/sh", "-c", hook], stdin=b"", stdout=out, stderr=out,
                                              check=False, env=env)
                rc = proc.returncode
        duration = round(trio.current_time() - started, 3)
        with open(log_path, "rb") as f:  # noqa: ASYNC230 - reads back what the hook just wrote
            f.seek(offset)
            output = f.read().decode(errors="replace").split("\n", 1)[-1][-OUTPUT_TAIL_CHARS:]
        result = {"command": hook, "rc": -1 if rc is None else rc, "duration_s": duration, "output": output,
                  "timed_out": rc is None}
        if rc == 0:
            log.warning("vault %s takeover hook ok (%.2f s): %s", self.w.vault, duration, hook)
        else:
            log.error("vault %s takeover hook FAILED (%s, %.2f s): %s: %s", self.w.vault,
                      "timed out" if rc is None else f"exit {rc}", duration, hook, output.strip()[-300:])
        return result


def _reclaim_files(root: Path, vault: str, epoch: int, seq: int, record: dict) -> None:
    """Target state of a replica at ``seq`` (the data made durable first), the takeover record kept as history."""
    sdir = vault_state_dir(root, vault)
    fd = os.open(root / vault, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        apply.barrier(fd)  # everything the mount wrote is on disk before `position` names it
    finally:
        os.close(fd)
    state.write_atomic(sdir / "epoch", f"{epoch}\n".encode(), 0o600)
    state.write_atomic(sdir / "position", struct.pack("<QQ", seq, seq), 0o600)
    (sdir / "progress").unlink(missing_ok=True)  # position is the truth now
    (sdir / "needs_resync").unlink(missing_ok=True)
    (sdir / "syncing").unlink(missing_ok=True)
    state.write_atomic(sdir / "synced", b"handed-back\n", 0o600)
    os.replace(takeover_path(root, vault), sdir / f"takeover-epoch-{record.get('epoch')}.json")


def _why_not(replica: Replica | None) -> str | None:
    """Why this replica must not become the primary, or None."""
    if replica is None:
        return "no replica of this vault here (no primary has connected since this target started)"
    if replica.vault_id is None:
        return "no primary has ever connected"
    if replica.needs_resync is not None:
        return f"the replica needs a resync: {replica.needs_resync}"
    if replica.sync is not None:
        return "a Synchronize is under way: the replica is not a state the primary had"
    return None


async def serve_failover(server: TargetServer, watches: list[Watch], secret: bytes, secret_file: Path,
                         health_address: tuple[str, int] | None) -> None:
    """Run a Watcher per vault and, if configured, the health responder (witness, planned handover) until cancelled."""
    watchers = {watch.vault: Watcher(server, watch, secret, secret_file) for watch in watches}

    async def reclaim(request: dict) -> dict:
        watcher = watchers.get(str(request.get("vault")))
        if watcher is None:
            raise ControlRequestError(f"no failover entry for vault {request.get('vault')!r}")
        try:
            reply = await watcher.reclaim(request.get("epoch"), request.get("seq"))
        except ValueError as exc:
            raise ControlRequestError(str(exc)) from None
        running[0].start_soon(watcher.run)  # watching the primary again (it is the other machine now)
        return reply

    server.control_handlers["reclaim"] = reclaim

    async def handover(body: dict) -> dict:
        watcher = watchers.get(body["vault"])
        if watcher is None:
            return {"accepted": False, "reason": f"this target has no failover entry for vault {body['vault']}"}
        return await watcher.handover(body.get("epoch"), body.get("seq"))

    def lookup(vault: str) -> health.Alive | None:
        extra = server.status_extra.get(vault, {})
        replica = server.replica(vault)
        if extra.get("role") == "primary":
            return None  # its mount daemon answers for it, on its own address
        if replica is None:
            return None
        return health.Alive(vault, "target", replica.epoch, replica.durable_seq)

    running: list = []
    async with trio.open_nursery() as nursery:
        running.append(nursery)
        nursery.start_soon(trio.sleep_forever)  # open for watchers re-armed by `reclaim` after the others end
        if health_address is not None:
            await nursery.start(lambda task_status: health.serve_health(
                *health_address, secret, lookup, witness=True, handover=handover, task_status=task_status))
        for watch in watches:
            log.info("vault %s: failover armed (heartbeat %g s, primary %s, witness %s, detection within %.2f s)",
                     watch.vault, watch.heartbeat_s, health.format_address(*watch.primary),
                     health.format_address(*watch.witness) if watch.witness else "none",
                     detection_bound(watch.heartbeat_s, watch.witness is not None))
            nursery.start_soon(watchers[watch.vault].run)


__all__ = ["Watch", "Watcher", "detection_bound", "load_record", "primary_state_dir", "serve_failover",
           "takeover_path"]
