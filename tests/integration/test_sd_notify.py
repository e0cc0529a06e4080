"""`Type=notify` in docs/systemd/: `octofs serve` and `octofs mount --foreground` send READY=1 once they serve.

The test plays systemd: it binds a unix datagram socket and hands its path to the
daemon in ``$NOTIFY_SOCKET``, as the service manager does.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import mounted, serving, write_vault_yaml
from tests.support.fuse import is_octofs_mounted


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # the daemons are started with os.environ
    try:
        yield sock
    finally:
        sock.close()


def test_serve_notifies_ready_once_listening(tmp_path: Path, notify_socket: socket.socket) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    with serving(tmp_path / "root", secret, workdir=tmp_path) as target:
        assert notify_socket.recv(4096) == b"READY=1"
        # By then it answers: the ready file and status are there.
        assert json.loads(target.ready_path.read_text())["pid"] == target.proc.pid
        assert target.status()["role"] == "target"


@pytest.mark.fuse
def test_mount_foreground_notifies_ready_once_mounted(tmp_path: Path, notify_socket: socket.socket) -> None:
    with mounted(write_vault_yaml(tmp_path)) as m:
        assert notify_socket.recv(4096) == b"READY=1"
        assert is_octofs_mounted(m.mnt)
        (m.mnt / "hello").write_text("hi")
        assert (m.backing / "hello").read_text() == "hi"
    assert m.proc.returncode == 0
