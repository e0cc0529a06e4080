"""probe.py: owns the probe of `octofs check` (docs/FORMAT.md §7.11): the target's answer and the primary's question.

Invariants:
- A probe runs the full handshake (version, both proofs, TLS when configured)
  and then only reads: the target builds ``ProbeInfo`` from files and statvfs,
  never opens or creates ``ROOT/NAME``, records nothing, and leaves the vault's
  live connection alone.
- The primary's side turns every way a probe can fail into one ``PeerError``
  subclass with its own exit code (unreachable 41, version 42, secret 44,
  certificate 47, ...), so `octofs check` can say exactly what is wrong.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import trio

from octofs import __version__, protocol, state
from octofs.errors import (
    PeerAuthError,
    PeerConnectError,
    PeerError,
    PeerVersionError,
    ProtocolError,
)
from octofs.link import open_link, tls_refusal
from octofs.replica import Replica, vault_state_dir
from octofs.tlsconf import ClientTls

TIMEOUT_S = 10.0


# -- the target's answer ---------------------------------------------------------------


def probe_info(root: Path, vault: str, vault_id: bytes, version: int, replica: Replica | None,
               connected: bool) -> protocol.ProbeInfo:
    """What the target tells a probe about ``vault`` (blocking: run in a thread)."""
    st = os.statvfs(root)
    sdir = vault_state_dir(root, vault)
    known_id: bytes | None = None
    epoch = applied = 0
    needs_resync: str | None = None
    consistent = True
    if replica is not None:
        known_id, epoch, applied = replica.vault_id, replica.epoch, replica.applied_seq
        needs_resync, consistent = replica.needs_resync, replica.consistent
    elif sdir.is_dir():
        with contextlib.suppress(OSError, ValueError):
            known_id = bytes.fromhex((sdir / "vault_id").read_text().strip())
        with contextlib.suppress(OSError, ValueError):
            epoch = int((sdir / "epoch").read_text().strip())
        needs_resync = state.needs_resync(sdir)
        consistent = needs_resync is None and not (sdir / "syncing").exists()
    return protocol.ProbeInfo(
        software=__version__,
        versions=tuple(protocol.SUPPORTED_VERSIONS),
        version=version,
        free_bytes=st.f_bavail * st.f_frsize,
        total_bytes=st.f_blocks * st.f_frsize,
        vault_known=known_id is not None,
        vault_id_matches=known_id is None or known_id == vault_id,
        epoch=epoch,
        applied_seq=applied,
        needs_resync=needs_resync,
        consistent=consistent,
        connected=connected,
    )


# -- the primary's question -------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """What a probe learnt. ``info`` is None when the target predates the probe (it sent a Welcome)."""

    info: protocol.ProbeInfo | None
    welcome: protocol.Welcome | None
    version: int
    tls: bool


async def probe_target(host: str, port: int, *, peer: str, vault: str, vault_id: bytes, epoch: int, secret: bytes,
                       tls: ClientTls | None, timeout_s: float = TIMEOUT_S) -> ProbeResult:
    """Connect, authenticate and ask (docs/FORMAT.md §7.11).

    Raises:
        PeerConnectError (41): unreachable. PeerVersionError (42): no common version.
        PeerAuthError (44): the secrets differ. PeerCertificateError (47): TLS failed.
        ProtocolError (45), PeerError (40): anything else the target said or did.
    """
    try:
        stream = await open_link(host, port, tls=tls, peer=peer, connect_timeout_s=timeout_s)
    except trio.TooSlowError:
        raise PeerConnectError(peer=peer, reason=f"no answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise PeerConnectError(peer=peer, reason=_os_reason(exc)) from None
    async with stream:
        try:
            with trio.fail_after(timeout_s):
                return await _ask(stream, peer, vault, vault_id, epoch, secret, tls is not None)
        except trio.TooSlowError:
            raise PeerError(peer=peer, reason=f"no complete handshake within {timeout_s:g} s") from None
        except (trio.BrokenResourceError, OSError) as exc:
            refusal = tls_refusal(exc, peer)
            if refusal is not None:
                raise refusal from None
            raise PeerError(peer=peer, reason=f"the connection broke during the handshake: {exc}") from None


async def _ask(stream: trio.abc.Stream, peer: str, vault: str, vault_id: bytes, epoch: int, secret: bytes,
               tls: bool) -> ProbeResult:
    decoder = protocol.FrameDecoder(peer=peer)
    nonce = protocol.new_nonce()
    await stream.send_all(protocol.encode(protocol.Hello(
        protocol.SUPPORTED_VERSIONS, vault, vault_id, epoch, nonce, 15.0, probe=True)))
    challenge = await _next(stream, decoder, peer, tls)
    if not isinstance(challenge, protocol.Challenge):
        raise ProtocolError(peer=peer, reason=f"expected challenge, got {type(challenge).__name__}")
    if challenge.version not in protocol.SUPPORTED_VERSIONS:
        raise PeerVersionError(f"Target {peer} chose protocol version {challenge.version}, which this octofs does "
                               f"not speak (it speaks {list(protocol.SUPPORTED_VERSIONS)})", peer=peer)
    if not protocol.proofs_equal(challenge.proof, protocol.target_proof(secret, nonce, challenge.nonce, vault_id)):
        raise PeerAuthError(peer=peer, reason="the target does not know the shared secret (the secret files differ)")
    await stream.send_all(protocol.encode(protocol.Auth(
        protocol.primary_proof(secret, nonce, challenge.nonce, vault_id))))
    answer = await _next(stream, decoder, peer, tls)
    if isinstance(answer, protocol.ProbeInfo):
        return ProbeResult(answer, None, challenge.version, tls)
    if isinstance(answer, protocol.Welcome):  # a target that predates the probe (§7.11)
        return ProbeResult(None, answer, challenge.version, tls)
    raise ProtocolError(peer=peer, reason=f"expected probe_info, got {type(answer).__name__}")


async def _next(stream: trio.abc.Stream, decoder: protocol.FrameDecoder, peer: str, tls: bool) -> protocol.Message:
    while True:
        msg = decoder.next_message()
        if msg is not None:
            if isinstance(msg, protocol.Error):
                raise refusal(msg, peer)
            return msg
        data = await stream.receive_some(65536)
        if not data:
            raise PeerError(peer=peer, reason="the target closed the connection during the handshake"
                                              + ("" if tls else " (does it accept only TLS? then give the target "
                                                                "tls: in vault.yaml)"))
        decoder.feed(data)


def refusal(msg: protocol.Error, peer: str) -> PeerError:
    """The PeerError for an Error frame from a target, with the exit code of its kind."""
    if msg.code == "auth":
        return PeerAuthError(peer=peer, reason=f"the target refused our proof: {msg.message}")
    if msg.code == "version":
        return PeerVersionError(f"Target {peer} refused the protocol version: {msg.message}", peer=peer)
    return PeerError(peer=peer, reason=f"refused ({msg.code}): {msg.message}")


def _os_reason(exc: OSError) -> str:
    # trio.open_tcp_stream raises "all attempts to connect ... failed" caused by the last attempt's error.
    cause = exc.__cause__
    errors = list(cause.exceptions) if isinstance(cause, BaseExceptionGroup) else [cause]
    reasons = sorted({e.strerror for e in errors if isinstance(e, OSError) and e.strerror})
    if reasons:
        return ", ".join(reasons)
    return exc.strerror or str(exc) or type(exc).__name__
