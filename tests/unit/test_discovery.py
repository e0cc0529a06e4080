"""discovery.py (the datagrams of `octofs discover`) and the pieces of beacon.py that need no network."""

from __future__ import annotations

import logging
import socket

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from octofs import beacon, codec, discovery
from octofs.discovery import Answer, DiscoveryError, Query

NONCE = bytes(range(8))
ANSWER = Answer(NONCE, "backup1", "", 7070, "0.1.0", (1,), "0123456789abcdef0123456789abcdef")


def test_query_round_trip() -> None:
    assert discovery.decode_query(discovery.encode_query(Query(NONCE))) == Query(NONCE)


def test_answer_round_trip_and_address() -> None:
    data = discovery.encode_answer(ANSWER)
    assert len(data) < discovery.MAX_DATAGRAM_BYTES
    got = discovery.decode_answer(data)
    assert got == ANSWER
    assert got.address("10.0.0.7") == "10.0.0.7:7070"  # empty host: the datagram's source
    assert Answer(NONCE, "b", "10.1.2.3", 7171, "1", (1, 2), ANSWER.fingerprint).address("10.0.0.7") == "10.1.2.3:7171"


def test_unknown_keys_are_ignored() -> None:
    doc = {"magic": "octofs-discover", "v": 1, "type": "query", "nonce": NONCE, "later": [1, 2, {"x": b""}]}
    assert discovery.decode_query(codec.packb(doc)) == Query(NONCE)


def _answer_doc(**changes) -> bytes:
    doc = {"magic": "octofs-discover", "v": 1, "type": "answer", "nonce": NONCE, "name": "backup1", "host": "",
           "port": 7070, "version": "0.1.0", "protocols": [1], "fingerprint": "0" * 32}
    doc.update(changes)
    return codec.packb({k: v for k, v in doc.items() if v is not ...})


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "not valid msgpack"),
    (b"\xc1", "not valid msgpack"),
    (b"\x92\x01\x02", "expected a map, got list"),
    (b"\xff" * 2000, "over 1024"),
    (codec.packb({"magic": "other", "v": 1, "type": "answer"}), "magic"),
    (_answer_doc(v=2), "unsupported discovery version 2"),
    (_answer_doc(v=True), "unsupported discovery version True"),
    (_answer_doc(type="query"), "expected a answer"),
    (_answer_doc(nonce=b"short"), "nonce: expected 8 bytes"),
    (_answer_doc(nonce="x" * 8), "nonce: expected bytes, got str"),
    (_answer_doc(name="../etc"), "bad name"),
    (_answer_doc(name=...), "name: expected str, got NoneType"),
    (_answer_doc(host="a b"), "bad host"),
    (_answer_doc(port=0), "bad port"),
    (_answer_doc(port=70000), "bad port"),
    (_answer_doc(port=True), "port: expected int, got bool"),
    (_answer_doc(version="1\n2"), "bad version"),
    (_answer_doc(protocols=[]), "bad protocols"),
    (_answer_doc(protocols=[1, "2"]), "bad protocols"),
    (_answer_doc(protocols=[True]), "bad protocols"),
    (_answer_doc(fingerprint="secret"), "bad fingerprint"),
    (_answer_doc(fingerprint="0" * 31 + "G"), "bad fingerprint"),
])
def test_bad_answers_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DiscoveryError) as info:
        discovery.decode_answer(data)
    assert reason in str(info.value)


def test_a_query_is_not_an_answer_and_vice_versa() -> None:
    with pytest.raises(DiscoveryError, match="expected a answer, got type 'query'"):
        discovery.decode_answer(discovery.encode_query(Query(NONCE)))
    with pytest.raises(DiscoveryError, match="expected a query, got type 'answer'"):
        discovery.decode_query(discovery.encode_answer(ANSWER))


@given(st.binary(max_size=1200))
def test_garbage_never_escapes_as_anything_but_discovery_error(data: bytes) -> None:
    for decode in (discovery.decode_query, discovery.decode_answer):
        try:
            decode(data)
        except DiscoveryError:
            pass


@given(st.dictionaries(st.sampled_from(["magic", "v", "type", "nonce", "name", "host", "port", "version",
                                        "protocols", "fingerprint", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.text(max_size=40),
                                 st.binary(max_size=40), st.lists(st.integers(-5, 70000), max_size=20),
                                 st.sampled_from(["octofs-discover", "answer", "query", "0" * 32]))))
def test_well_formed_msgpack_with_wrong_fields_never_escapes(doc: dict) -> None:
    doc.setdefault("magic", "octofs-discover")
    data = codec.packb(doc)
    for decode in (discovery.decode_query, discovery.decode_answer):
        try:
            decode(data)
        except DiscoveryError:
            pass


def test_target_fingerprint_is_random_stable_and_repaired(tmp_path) -> None:
    first = beacon.target_fingerprint(tmp_path / ".octofs")
    assert len(first) == 32 and int(first, 16) >= 0
    assert beacon.target_fingerprint(tmp_path / ".octofs") == first
    assert beacon.target_fingerprint(tmp_path / "other" / ".octofs") != first
    (tmp_path / ".octofs" / "fingerprint").write_text("garbage\n")
    repaired = beacon.target_fingerprint(tmp_path / ".octofs")
    assert len(repaired) == 32 and repaired != first


def test_loopback_detection() -> None:
    assert beacon.is_loopback("127.0.0.1") and beacon.is_loopback("::1") and beacon.is_loopback("localhost")
    assert not beacon.is_loopback("0.0.0.0") and not beacon.is_loopback("10.213.1.2")


def test_interfaces_include_loopback() -> None:
    itfs = beacon.ipv4_interfaces()
    assert any(i.loopback and i.address == "127.0.0.1" for i in itfs), itfs


async def test_responder_answers_a_query_and_drops_garbage(caplog) -> None:
    """The trio responder on 127.0.0.1 (a unicast query; broadcast is the netns test's job)."""
    caplog.set_level(logging.DEBUG, logger="octofs.beacon")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: beacon.serve_discovery(
            ANSWER, port=0, host="127.0.0.1", task_status=task_status))
        assert port
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            await sock.sendto(b"\x00garbage", ("127.0.0.1", port))
            nonce = b"n" * 8
            await sock.sendto(discovery.encode_query(Query(nonce)), ("127.0.0.1", port))
            with trio.fail_after(10):
                data, _ = await sock.recvfrom(2048)
        got = discovery.decode_answer(data)
        assert got == Answer(nonce, *beacon._fields(ANSWER))
        nursery.cancel_scope.cancel()
    assert any("ignoring a datagram" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
