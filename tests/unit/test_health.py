"""health.py: the authenticated UDP probe of failover (docs/FORMAT.md §11.1), on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest
import trio

from octofs import codec, health

SECRET = b"the shared secret"


def test_roundtrip_and_refusals() -> None:
    body = {"type": "probe", "vault": "web", "nonce": b"n" * 16}
    data = health.encode(SECRET, body)
    assert health.decode(SECRET, data) == body
    with pytest.raises(health.HealthError, match="bad mac"):
        health.decode(b"another secret", data)
    outer = codec.unpackb(data)
    outer["b"] = codec.packb({**body, "vault": "other"})  # the body changed, the mac kept
    with pytest.raises(health.HealthError, match="bad mac"):
        health.decode(SECRET, codec.packb(outer))
    for garbage in (b"", b"\x00" * 10, codec.packb([1, 2]), codec.packb({"m": "octofs-health", "v": 2}),
                    b"x" * 3000):
        with pytest.raises(health.HealthError):
            health.decode(SECRET, garbage)
    short_nonce = health.encode(SECRET, {**body, "nonce": b"n"})
    with pytest.raises(health.HealthError, match="nonce"):
        health.decode(SECRET, short_nonce)


async def _serve(nursery, **kw) -> tuple[str, int]:
    def lookup(vault: str) -> health.Alive | None:
        return health.Alive(vault, "primary", 4, 99) if vault == "web" else None

    return await nursery.start(lambda task_status: health.serve_health("127.0.0.1", 0, SECRET, lookup,
                                                                       task_status=task_status, **kw))


async def test_probe_answers_only_with_the_secret_and_for_known_vaults() -> None:
    async with trio.open_nursery() as nursery:
        address = await _serve(nursery)
        alive = await health.probe(address, "web", SECRET, timeout_s=1.0)
        assert alive == health.Alive("web", "primary", 4, 99)
        # Unknown vault, wrong secret: no answer at all (nothing told to a stranger).
        assert await health.probe(address, "other", SECRET, timeout_s=0.2, tries=1) is None
        assert await health.probe(address, "web", b"wrong", timeout_s=0.2, tries=1) is None
        # A request reflected back at the client is not an answer: the types differ.
        request = health.encode(SECRET, {"type": "probe", "vault": "web", "nonce": b"r" * 16})
        with pytest.raises(health.HealthError):
            health.alive_from(health.decode(SECRET, request))
        nursery.cancel_scope.cancel()


async def test_garbage_does_not_stop_the_responder() -> None:
    async with trio.open_nursery() as nursery:
        address = await _serve(nursery)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for junk in (b"", b"\xff" * 100, codec.packb({"m": "octofs-health", "v": 1, "b": b"x", "mac": b"y"})):
            s.sendto(junk, address)
        s.close()
        assert await health.probe(address, "web", SECRET, timeout_s=1.0) is not None
        nursery.cancel_scope.cancel()


async def test_witness_sees_a_live_primary_and_not_a_dead_one() -> None:
    async with trio.open_nursery() as nursery:
        primary = await _serve(nursery)
        witness = await nursery.start(lambda task_status: health.serve_health(
            "127.0.0.1", 0, SECRET, lambda v: None, witness=True, task_status=task_status))
        seen = await health.ask_witness(witness, primary, "web", SECRET, timeout_s=0.2)
        assert seen is not None and seen.seen and seen.alive.epoch == 4
        dead = ("127.0.0.1", 9)  # discard port: nobody answers
        seen = await health.ask_witness(witness, dead, "web", SECRET, timeout_s=0.1)
        assert seen is not None and not seen.seen
        # A witness that does not know the secret is silent: no majority.
        assert await health.ask_witness(witness, primary, "web", b"wrong", timeout_s=0.1, tries=1) is None
        nursery.cancel_scope.cancel()
