"""Protocol additions of issue 8 (docs/FORMAT.md §7.10-§7.13): probe, compression frames, version choice;
the compression policy and the bandwidth token bucket."""

from __future__ import annotations

import functools
import os

import pytest
import trio
import zstandard

from octofs import codec, compression, protocol
from octofs.errors import ProtocolError
from octofs.link import TokenBucket

VID = bytes(range(16))


def roundtrip(msg: protocol.Message, **kw) -> protocol.Message:
    d = protocol.FrameDecoder(**kw)
    d.feed(protocol.encode(msg))
    return d.next_message()


def test_hello_optional_fields_roundtrip_and_default_when_absent() -> None:
    h = protocol.Hello((1, 2), "v", VID, 3, bytes(32), 15.0, probe=True, compress=("zstd",))
    assert roundtrip(h) == h
    # A hello from a primary that predates them: no probe, no compress keys.
    old = codec.packb({"t": "hello", "versions": [1], "vault": "v", "vault_id": VID, "epoch": 1, "nonce": bytes(32),
                       "heartbeat_s": 15.0})
    got = protocol.decode_payload(old)
    assert got.probe is False and got.compress == ()


def test_welcome_compress_is_optional() -> None:
    w = protocol.Welcome(5, 1, True, compress="zstd")
    assert roundtrip(w) == w
    assert roundtrip(protocol.Welcome(5, 1, True)).compress is None


def test_probe_info_roundtrip() -> None:
    info = protocol.ProbeInfo("0.1.0", (1,), 1, 10, 20, True, False, 4, 99, "why", False, True)
    assert roundtrip(info) == info


def test_choose_version() -> None:
    assert protocol.choose_version((1, 2)) == 1
    assert protocol.choose_version((2,)) is None


def records(n: int = 50) -> tuple[bytes, ...]:
    return tuple(codec.packb({"s": i, "pad": b"a" * 200}) for i in range(1, n + 1))


def test_zops_decodes_to_the_op_batch_only_when_agreed() -> None:
    recs = records()
    data = compression.BatchCompressor("zstd").compress(protocol.pack_records(recs))
    frame = protocol.encode_zops("zstd", data)
    assert len(frame) < sum(map(len, recs)) // 5
    d = protocol.FrameDecoder(compress="zstd")
    d.feed(frame)
    assert d.next_message() == protocol.OpBatch(recs)
    for agreed in (None, "lz4"):
        d = protocol.FrameDecoder(compress=agreed)
        d.feed(frame)
        with pytest.raises(ProtocolError, match="was not agreed"):
            d.next_message()


@pytest.mark.parametrize("data, reason", [
    (zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 1000), "does not state its content size"),
    (b"garbage" * 10, "not a zstd frame"),
])
def test_zops_bad_data_is_a_protocol_violation(data: bytes, reason: str) -> None:
    d = protocol.FrameDecoder(compress="zstd")
    d.feed(protocol.encode_zops("zstd", data))
    with pytest.raises(ProtocolError, match=reason):
        d.next_message()


def test_zops_bomb_is_refused_before_decompressing() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (protocol.MAX_FRAME_BYTES + 1))
    assert len(bomb) < 100_000
    d = protocol.FrameDecoder(compress="zstd")
    d.feed(protocol.encode_zops("zstd", bomb))
    with pytest.raises(ProtocolError, match="above the limit"):
        d.next_message()


def test_auto_sends_incompressible_batches_plain_and_tests_again_later() -> None:
    c = compression.BatchCompressor("auto")
    assert c.compress(b"abc" * 10_000) is not None
    noise = os.urandom(100_000)
    assert c.compress(noise) is None
    # Then plain without trying for AUTO_RETRY_EVERY - 1 batches, even compressible ones.
    skipped = [c.compress(b"abc" * 10_000) for _ in range(compression.AUTO_RETRY_EVERY - 1)]
    assert skipped == [None] * (compression.AUTO_RETRY_EVERY - 1)
    assert c.compress(b"abc" * 10_000) is not None
    assert compression.BatchCompressor("zstd").compress(noise) is not None  # zstd: always
    assert c.compress(b"tiny") is None


async def test_token_bucket_holds_the_rate(autojump_clock) -> None:
    bucket = TokenBucket(1_000_000, burst=64 * 1024)
    start = trio.current_time()
    sent = 0
    while sent < 10_000_000:
        await bucket.take(200_000)
        sent += 200_000
    elapsed = trio.current_time() - start
    # 10 MB at 1 MB/s, less the initial burst: 9.93 s (the last frame's wait is included).
    assert elapsed == pytest.approx((10_000_000 - 64 * 1024) / 1_000_000, rel=0.01)


# -- the probe against fake targets (real TCP on 127.0.0.1) ------------------------------------------------


async def _fake_target(nursery, answer) -> int:
    """A listener that reads a hello and answers with ``answer(hello)`` (a list of messages); returns its port."""

    async def handle(stream) -> None:
        decoder = protocol.FrameDecoder()
        secret = b"s"
        while (hello := decoder.next_message()) is None:
            decoder.feed(await stream.receive_some(65536))
        for msg in answer(hello, secret):
            await stream.send_all(protocol.encode(msg))
            if isinstance(msg, protocol.Challenge):
                while decoder.next_message() is None:  # the auth
                    decoder.feed(await stream.receive_some(65536))
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def test_probe_refuses_a_version_it_did_not_offer(nursery) -> None:
    from octofs.errors import PeerVersionError
    from octofs.probe import probe_target

    def answer(hello, secret):
        nonce = protocol.new_nonce()
        return [protocol.Challenge(2, nonce, protocol.target_proof(secret, hello.nonce, nonce, hello.vault_id))]

    port = await _fake_target(nursery, answer)
    with pytest.raises(PeerVersionError, match=r"chose protocol version 2, which this octofs does not speak \(it speaks \[1\]\)"):
        await probe_target("127.0.0.1", port, peer="t", vault="v", vault_id=VID, epoch=1, secret=b"s", tls=None)


async def test_probe_of_a_target_that_predates_it_reports_the_welcome(nursery) -> None:
    from octofs.probe import probe_target

    def answer(hello, secret):
        assert hello.probe is True
        nonce = protocol.new_nonce()
        return [protocol.Challenge(1, nonce, protocol.target_proof(secret, hello.nonce, nonce, hello.vault_id)),
                protocol.Welcome(42, 3, True)]

    port = await _fake_target(nursery, answer)
    result = await probe_target("127.0.0.1", port, peer="t", vault="v", vault_id=VID, epoch=1, secret=b"s", tls=None)
    assert result.info is None and result.welcome.acked_seq == 42 and result.version == 1
