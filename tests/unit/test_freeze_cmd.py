"""cli/freeze_cmd.py: `freeze --exec` and a SIGTERM that lands just as the freeze is granted.

The serve daemon is replaced by a stand-in ``control`` (the whole command, daemon included, runs in
tests/integration/test_freeze.py); the signal, the shell and CMD are real.

The signal goes to the main thread (``pthread_kill``), not to the process (``os.kill``): the CLI has
one thread, so a kill reaches that thread, the one whose mask holds SIGTERM off. The pytest process
has others (trio's idle worker threads from earlier tests, SIGTERM unblocked in them): the kernel gave
a process-directed SIGTERM to one of those, and Python ran the handler in the main thread at once,
mask or not (both tests failed in every run of tests/unit after test_freeze.py).
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from octofs.cli import freeze_cmd


def _args(tmp_path: Path, cmd: str) -> argparse.Namespace:
    return argparse.Namespace(vault="v", root=str(tmp_path), max="1h", exec_cmd=cmd, json=False, quiet=True)


def _sigterm() -> None:
    """A kill of the (single-threaded) CLI: SIGTERM to the thread that runs it (see the docstring above)."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)


@pytest.fixture
def leaked() -> list[int]:
    """A SIGTERM handler of the test's own: what reaches it escaped freeze_cmd's handling."""
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    yield got
    signal.signal(signal.SIGTERM, previous)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def test_sigterm_with_the_freeze_reply_kills_cmd_and_thaws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           leaked: list[int]):
    """SIGTERM arriving the instant the freeze is granted, before CMD starts: CMD is killed at once and
    the vault thawed, exit 143; before, the CLI ended there with the vault frozen until --max."""
    calls: list[tuple[str, dict[str, Any]]] = []

    def control(args: argparse.Namespace, cmd: str, **fields: Any) -> dict[str, Any]:
        calls.append((cmd, fields))
        if cmd == "freeze":
            _sigterm()  # the scheduler's stop, as the reply comes back
            return {"id": 7, "seq": 12, "replica_dir": str(tmp_path), "primary_time_ns": None, "max_s": 3600.0}
        return {"ok": True, "status": "thawed"}

    monkeypatch.setattr(freeze_cmd, "control", control)
    marker = tmp_path / "ran"
    code = freeze_cmd.run(_args(tmp_path, f"sleep 30; touch {marker}"))
    assert code == 128 + signal.SIGTERM
    assert [c for c, _ in calls] == ["freeze", "thaw"] and calls[1][1]["id"] == 7
    assert leaked == [] and not marker.exists()
    assert signal.getsignal(signal.SIGTERM) is not freeze_cmd._terminated  # the test's handler is back
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_a_refused_freeze_leaves_sigterm_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     leaked: list[int]):
    def control(args: argparse.Namespace, cmd: str, **fields: Any) -> dict[str, Any]:
        _sigterm()  # held while the request is out
        raise freeze_cmd.FreezeError(vault="v", reason="no such vault")

    monkeypatch.setattr(freeze_cmd, "control", control)
    with pytest.raises(freeze_cmd.FreezeError):
        freeze_cmd.run(_args(tmp_path, "true"))
    assert leaked == [signal.SIGTERM]  # delivered to the handler that was there, once nothing was frozen
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
