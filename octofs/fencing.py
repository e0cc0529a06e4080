"""fencing.py: owns the primary's fenced state: read-only because another machine took over the vault.

A primary is fenced when a target refuses it for a stale epoch (its shipper gets an
``epoch`` Error: that target took over, docs/FORMAT.md §11). From then on the mount
refuses every change with EROFS, exactly as in failsafe (fs/operations.py ``_admit``),
status and the log say so, the health responder answers ``fenced`` instead of
``primary``, and the daemon waits (``octofs failback`` or an operator clears it).

Invariants:
- The fence is persisted (``STATE/fenced``, atomically) before it is reported, so a
  remount of the old primary stays read-only: it never again accepts a change that
  the new primary cannot see.
- Only ``clear`` lifts it, and only on request (failback).
"""

from __future__ import annotations

import logging
import shutil
import struct
from pathlib import Path

import trio

from octofs import health, replica, state
from octofs.control import request
from octofs.errors import OctofsError
from octofs.health import Alive
from octofs.recorder import Recorder

log = logging.getLogger(__name__)

FENCED_FILE = "fenced"


def fenced_path(state_dir: Path) -> Path:
    return Path(state_dir) / FENCED_FILE


def load(state_dir: Path) -> str | None:
    """Why the vault is fenced (persisted), or None."""
    try:
        return fenced_path(state_dir).read_text().strip() or "fenced"
    except FileNotFoundError:
        return None


def fence(state_dir: Path, recorder: Recorder, message: str) -> None:
    """Make the vault read-only because a newer primary exists; persisted first."""
    if recorder.fenced is not None:
        return
    try:
        state.write_atomic(fenced_path(state_dir), message.encode() + b"\n", 0o600)
    except OSError as exc:  # still fenced in memory
        log.error("cannot record that the vault is fenced: %s", exc)
    recorder.fenced = message
    log.error("FENCED: another machine is the primary of this vault now; the mount is read-only (EROFS on "
              "changes) until `octofs failback`: %s", message)


def clear(state_dir: Path, recorder: Recorder | None) -> None:
    fenced_path(state_dir).unlink(missing_ok=True)
    if recorder is not None and recorder.fenced is not None:
        log.warning("fence lifted: the vault accepts changes again")
        recorder.fenced = None


def primary_lookup(vault: str, recorder: Recorder, epoch: int):
    """The health responder's answer for this mount: primary (or fenced) of ``vault`` at ``epoch``."""

    def lookup(name: str) -> Alive | None:
        if name != vault:
            return None
        role = "fenced" if recorder.fenced is not None else "primary"
        return Alive(vault, role, epoch, recorder.writer.last_seq)

    return lookup


HANDOVER_TRIES = 5


def seed_target(root: Path, vault: str, backing: Path, vault_id: bytes, epoch: int, seq: int) -> Path:
    """Make the backing dir ``ROOT/NAME`` a target's replica dir at ``seq`` of ``epoch`` (docs/FORMAT.md §11.4).

    The local ``octofs serve --root ROOT`` then receives the vault from the new primary and resumes
    after ``seq``, with nothing to synchronize. Raises ValueError when the layout does not allow it.
    """
    root = Path(root).resolve()
    if Path(backing).resolve() != root / vault:
        raise ValueError(f"the backing dir {backing} is not {root / vault}: to become a target, the backing dir must "
                         "be ROOT/VAULT of the serve root")
    sdir = replica.vault_state_dir(root, vault)
    if sdir.exists():
        raise ValueError(f"{sdir} exists: the serve root already has state for vault {vault}")
    sdir.mkdir(mode=0o700, parents=True)
    state.write_atomic(sdir / "vault_id", vault_id.hex().encode() + b"\n", 0o600)
    state.write_atomic(sdir / "epoch", f"{epoch}\n".encode(), 0o600)
    state.write_atomic(sdir / "position", struct.pack("<QQ", seq, seq), 0o600)
    state.write_atomic(sdir / "synced", b"handover\n", 0o600)
    return sdir


async def hand_over(*, vault: str, state_dir: Path, recorder: Recorder, shippers: list, secret: bytes, epoch: int,
                    target: str | None, to: tuple[str, int] | None, timeout_s: float,
                    become_target: tuple[Path, Path, bytes] | None = None) -> dict:
    """A planned switch (``octofs failover``): drain, wait until the target has everything, hand over.

    1. Drain: the vault is fenced at once (every later change fails with EROFS; a change already
       past its admission is journaled before this returns to the event loop).
    2. Wait until the target has acked the last seq and is consistent.
    3. Ask the target's health responder (``to``, default its host and port 7071) to take over at
       that seq (health.request_handover). It raises the epoch, which ends our connection with an
       ``epoch`` refusal: from then on this primary stays fenced, and no op was lost.

    With ``become_target`` (serve root, backing dir, vault id), the backing dir is made the replica
    dir of that serve root at the drained seq (``seed_target``) just before the request, so the new
    primary streams to this machine from there (FORMAT §11.4).

    On failure the fence is lifted again and the reason is returned (``accepted`` False).
    """
    chosen = [sh for sh in shippers if target in (None, sh.name)]
    if not chosen:
        return {"accepted": False, "reason": f"vault {vault} has no target named {target!r}" if target
                else f"vault {vault} has no targets"}
    if len(chosen) > 1:
        return {"accepted": False, "reason": "the vault has several targets: name one (--target)"}
    sh = chosen[0]
    if recorder.fenced is not None:
        return {"accepted": False, "reason": f"vault {vault} is fenced already: {recorder.fenced}"}
    address = to or (sh.host, health.DEFAULT_PORT)
    fence(state_dir, recorder, f"planned failover: handing over to target {sh.name} ({sh.address})")
    answer: dict | None = None
    asked = False
    seeded: Path | None = None
    seeded_seq: int | None = None
    seq = recorder.writer.last_seq
    with trio.move_on_after(timeout_s):
        for _ in range(HANDOVER_TRIES):
            seq = recorder.writer.last_seq  # only fsync barriers can still be appended while fenced
            await recorder.wait_durable(seq, urgent=True)
            await sh.wait_acked(seq)
            await sh.wait_consistent()
            log.info("vault %s drained at seq %d, acked by target %s: asking it to take over", vault, seq, sh.name)
            if become_target is not None and seeded_seq != seq:
                root, backing, vault_id = become_target
                try:
                    if seeded is not None:  # an fsync barrier was appended since: seed at the new seq
                        shutil.rmtree(seeded)
                    seeded, seeded_seq = seed_target(root, vault, backing, vault_id, epoch + 1, seq), seq
                except (ValueError, OSError) as exc:
                    clear(state_dir, recorder)
                    return {"accepted": False, "reason": str(exc), "seq": seq, "fenced": False}
            asked = True
            answer = await health.request_handover(address, vault, secret, epoch=epoch, seq=seq,
                                                   timeout_s=max(1.0, timeout_s / 2))
            if answer is not None and (answer.get("accepted") or seq == recorder.writer.last_seq):
                break
    if not asked:
        clear(state_dir, recorder)
        reason = (f"target {sh.name} did not ack seq {seq} (or finish a Synchronize) within {timeout_s:g} s: "
                  f"{sh.last_error or sh.state}; nothing was handed over")
        log.error("planned failover of vault %s: %s", vault, reason)
        return {"accepted": False, "reason": reason, "seq": seq, "fenced": False}
    if answer is None:
        # It may have taken over and its answer got lost: stay fenced (never two primaries).
        reason = (f"the target did not answer the handover request at {health.format_address(*address)}; "
                  "the vault stays fenced (read-only) until you check the target: `octofs status --root` there")
        log.error("planned failover of vault %s to %s: %s", vault, sh.name, reason)
        return {"accepted": False, "reason": reason, "seq": seq, "fenced": True}
    if not answer.get("accepted"):
        reason = str(answer.get("reason"))
        clear(state_dir, recorder)  # the target refused: it did not take over, so this stays the primary
        if seeded is not None:
            shutil.rmtree(seeded, ignore_errors=True)
        log.error("planned failover of vault %s to %s refused: %s", vault, sh.name, reason)
        return {"accepted": False, "reason": reason, "seq": seq, "fenced": False}
    new_epoch = answer.get("epoch")
    recorder.fenced = None  # rewritten with the outcome
    fence(state_dir, recorder, f"handed over to target {sh.name} ({sh.address}) at seq {seq}: it is the primary "
          f"at epoch {new_epoch} now")
    return {"accepted": True, "seq": seq, "epoch": new_epoch, "target": sh.name}


async def hold_until_first_contact(recorder: Recorder, shippers: list, timeout_s: float) -> None:
    """Resume changes (held by ``recorder.pause()`` at mount) once every target has welcomed this primary
    at its epoch or refused it (then it is fenced and changes fail with EROFS), or after ``timeout_s``.

    Without this, an old primary that comes back after a takeover would accept changes in the
    moments before its shipper learns of the higher epoch: changes the new primary never sees.
    """
    try:
        with trio.move_on_after(timeout_s) as scope:
            while not all(sh.fenced or sh.state == "connected" for sh in shippers):
                await trio.sleep(0.02)  # shippers have no event for "first contact"; this runs once per mount
        if scope.cancelled_caught:
            log.warning("no contact with every target within %g s of mounting: changes go ahead (%s)", timeout_s,
                        ", ".join(f"{sh.name}: {sh.last_error or sh.state}" for sh in shippers))
    finally:
        recorder.resume()


async def give_back(*, vault: str, state_dir: Path, recorder: Recorder, shippers: list, secret: bytes, epoch: int,
                    backing: Path, body: dict, unmount) -> dict:
    """The primary's side of ``octofs failback`` (a ``failback`` health request from the old primary).

    The old primary, a target of ours now and caught up, asks for the vault back: a planned switch
    to it (``hand_over``). When this mount is itself a takeover by ``octofs serve`` (its backing dir is
    ``ROOT/VAULT`` with a takeover record), that serve is told to ``reclaim`` the replica dir at the
    handed-over seq, so it becomes a target again; then this mount unmounts itself (after the answer).
    """
    to = body.get("to")
    try:
        host, _, port = str(to).rpartition(":")
        address = (host.strip("[]"), int(port))
    except ValueError:
        return {"accepted": False, "reason": f"bad 'to' address {to!r}"}
    chosen = [sh for sh in shippers if sh.host == address[0]]
    if len(chosen) != 1:
        return {"accepted": False, "reason": f"vault {vault} has no (single) target on host {address[0]}"}
    sh = chosen[0]
    if sh.acked_seq != body.get("seq") and sh.acked_seq < recorder.writer.last_seq:
        log.info("failback of vault %s to %s: it is at seq %s, the journal at %d; draining first", vault, sh.name,
                 body.get("seq"), recorder.writer.last_seq)
    result = await hand_over(vault=vault, state_dir=state_dir, recorder=recorder, shippers=shippers, secret=secret,
                             epoch=epoch, target=sh.name, to=address, timeout_s=60.0)
    if not result.get("accepted"):
        return {k: v for k, v in result.items() if k in ("accepted", "reason", "seq", "epoch")}
    root = Path(backing).parent
    if Path(backing).name == vault and (replica.vault_state_dir(root, vault) / "takeover.json").exists():
        try:
            await trio.to_thread.run_sync(lambda: request(replica.control_socket_path(root), "reclaim", vault=vault,
                                                          epoch=result["epoch"], seq=result["seq"]))
        except OctofsError as exc:
            log.error("vault %s handed back, but the local octofs serve could not reclaim its replica dir: %s",
                      vault, exc.message)
    log.warning("vault %s handed back to %s at seq %d (epoch %s): unmounting", vault, sh.name, result["seq"],
                result["epoch"])
    return {"accepted": True, "seq": result["seq"], "epoch": result["epoch"], "_after": unmount}


__all__ = ["clear", "fence", "fenced_path", "give_back", "hand_over", "hold_until_first_contact", "load",
           "primary_lookup"]
