"""The control channel: any socket path length, and a failing handler does not take the server down."""

from __future__ import annotations

from pathlib import Path

import trio

from octofs.control import ControlRequestError, request, serve_control


async def _serve_and_ask(sock: Path, calls: list[tuple[str, dict]]) -> list[dict]:
    async def status(req: dict) -> dict:
        return {"answer": 42}

    async def broken(req: dict) -> dict:
        raise RuntimeError("a bug in a handler")

    async def refused(req: dict) -> dict:
        raise ControlRequestError("no such target")

    replies = []
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, sock, {"status": status, "broken": broken, "refused": refused})
        for cmd, fields in calls:
            replies.append(await trio.to_thread.run_sync(lambda c=cmd, f=fields: request(sock, c, **f)))
        nursery.cancel_scope.cancel()
    return replies


async def test_a_socket_path_longer_than_sun_path(tmp_path: Path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    sock = deep / "control.sock"
    assert len(str(sock)) > 107
    assert await _serve_and_ask(sock, [("status", {})]) == [{"ok": True, "answer": 42}]
    assert not sock.exists()  # removed on the way out


async def test_a_failing_handler_answers_ok_false_and_the_server_goes_on(tmp_path: Path):
    replies = await _serve_and_ask(tmp_path / "c.sock", [("broken", {}), ("refused", {}), ("status", {}),
                                                         ("nope", {})])
    assert replies[0]["ok"] is False and "RuntimeError: a bug in a handler" in replies[0]["error"]
    assert replies[1] == {"ok": False, "error": "no such target"}
    assert replies[2] == {"ok": True, "answer": 42}
    assert replies[3]["ok"] is False and "unknown command" in replies[3]["error"]
