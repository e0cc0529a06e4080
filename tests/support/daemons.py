"""Starting octofs daemons as subprocesses for tests, with a teardown that always cleans up.

- ``mounted(vault_yaml)``: a primary (`octofs mount --foreground`), always unmounted and reaped.
- ``serving(root, secret_file)``: a target (`octofs serve`), restartable on the same port,
  always stopped.
- ``wait_until(...)``: the polling loop (with a deadline) for waiting on observable state.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from octofs import control, paths
from octofs.replica import control_socket_path
from tests.support.fuse import unmount, wait_for_ready

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]


def octofs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "octofs", *args]


def run_octofs(*args: str, check: bool = False, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(octofs_cmd(*args), capture_output=True, text=True, check=check, timeout=timeout,
                          env=env, **kw)


def write_vault_yaml(tmp_path: Path, *, name: str = "vault", backing: Path | None = None,
                     extra: dict | None = None) -> Path:
    backing = backing or tmp_path / "backing"
    backing.mkdir(parents=True, exist_ok=True)
    doc = {"vault": name, "backing": str(backing), "state_dir": str(tmp_path / "state")}
    doc.update(extra or {})
    path = tmp_path / "vault.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class MountHandle:
    proc: subprocess.Popen
    mnt: Path
    backing: Path
    state_dir: Path
    log_path: Path

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / "journal"

    def status(self) -> dict[str, Any]:
        """The daemon's status document (the control socket's ``status``; docs/CLI_JSON.md)."""
        reply = control.request(paths.control_socket_path(self.state_dir), "status")
        assert reply.pop("ok"), reply
        return reply

    def target_status(self, name: str) -> dict[str, Any]:
        """``status()["targets"]`` entry of target ``name``."""
        [entry] = [t for t in self.status()["targets"] if t["name"] == name]
        return entry

    def wait_synced(self, timeout: float = 60.0, seq: int | None = None) -> int:
        """The barrier: every target has acked ``seq`` (default: everything journaled now). Returns the seq."""
        reply = control.request(paths.control_socket_path(self.state_dir), "wait_synced",
                                io_timeout_s=timeout + 30, seq=seq, timeout_s=timeout)
        assert reply.get("ok") and reply["synced"], f"not synced: {reply}\n{_tail(self.log_path)}"
        return reply["seq"]

    def log(self) -> str:
        return _tail(self.log_path)


@contextlib.contextmanager
def mounted(vault_yaml: Path, mnt: Path | None = None, *, timeout: float = 30.0,
            extra_args: tuple[str, ...] = ()) -> Iterator[MountHandle]:
    """A foreground `octofs mount` subprocess; on exit, always unmounted and reaped.

    The test asserts the daemon's exit code itself where it matters
    (``handle.proc.returncode`` after the block).
    """
    doc = yaml.safe_load(vault_yaml.read_text())
    mnt = mnt or vault_yaml.parent / "mnt"
    mnt.mkdir(exist_ok=True)
    log_path = vault_yaml.parent / f"mount-{mnt.name}.log"
    ready = vault_yaml.parent / f"ready-{mnt.name}.json"
    ready.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            octofs_cmd("-v", "mount", "--foreground", "--ready-file", str(ready), *extra_args,
                       str(vault_yaml), str(mnt)),
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
        )
    try:
        wait_for_ready(proc, ready, mnt, timeout, log_path)
        yield MountHandle(proc, mnt, Path(doc["backing"]), Path(doc["state_dir"]), log_path)
    finally:
        unmount(proc, mnt)


# -- waiting on observable state -------------------------------------------------------------


def wait_until(probe: Callable[[], T], *, timeout: float, what: str, interval: float = 0.02) -> T:
    """Call ``probe`` until it returns something truthy and return that; fail after ``timeout`` s.

    For state changes that have no barrier of their own (a status field, a file):
    a polling loop with a deadline, never a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


# -- the target: `octofs serve` ----------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, chosen *below* the kernel's ephemeral range.

    For a target that must come back on the same port: a port from the ephemeral range
    (what port 0 gives) could meanwhile be taken as the source port of an outgoing
    connection, and a client retrying against a port nobody listens on can even
    connect to itself (TCP simultaneous open) when the kernel picks that very port.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))  # no SO_REUSEADDR: fails if anything (even TIME_WAIT) holds it
            except OSError:
                continue
        return port
    raise AssertionError("no free port found below the ephemeral range")


class Serve:
    """An `octofs serve` subprocess: its root, ready file and log.

    ``start()`` listens on ``port`` (0: any free port); once it has run, the bound port
    is kept, so a ``start()`` after ``kill()`` or ``stop()`` comes back on the *same*
    address, as a restarted target does.
    """

    def __init__(self, root: Path, secret_file: Path, *, workdir: Path, port: int = 0, name: str = "serve",
                 host: str = "127.0.0.1") -> None:
        self.root, self.secret_file, self.host, self.port = root, secret_file, host, port
        self.log_path = workdir / f"{name}.log"
        self.ready_path = workdir / f"{name}-ready.json"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.ready_info: dict[str, Any] = {}  # the last start's ready file

    @property
    def address(self) -> tuple[str, int]:
        assert self.port, "not started yet"
        return self.host, self.port

    @property
    def address_str(self) -> str:
        """``host:port``, as vault.yaml's ``targets[].address`` wants it."""
        return "{}:{}".format(*self.address)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, user: int | None = None, timeout: float = 30.0, extra_args: tuple[str, ...] = ()) -> None:
        assert not self.running, "already running"
        self.ready_path.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log_path, "ab") as logf:
            logf.write(f"---- start {self.starts} on {self.host}:{self.port}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                octofs_cmd("serve", "--root", str(self.root), "--listen", f"{self.host}:{self.port}",
                           "--secret-file", str(self.secret_file), "--ready-file", str(self.ready_path),
                           *extra_args),
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, user=user, cwd="/")
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not self.ready_path.exists():
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"serve not ready after {timeout} s:\n{self.log()}"
            time.sleep(0.02)
        info = json.loads(self.ready_path.read_text())
        self.ready_info = info
        assert info["pid"] == self.proc.pid
        host, _, port = info["listen"].rpartition(":")
        assert self.port in (0, int(port)), info
        self.host, self.port = host, int(port)

    def log(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, and reap."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send ``signum`` (a clean stop by default) and return the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        """Teardown: stop it if it still runs (SIGTERM, then SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def status(self) -> dict[str, Any]:
        """The target's status document (control socket at ROOT/.octofs/control.sock, ``role: target``)."""
        reply = control.request(control_socket_path(self.root), "status")
        assert reply.pop("ok"), reply
        assert reply["role"] == "target", reply
        return reply

    def vault_status(self, vault: str) -> dict[str, Any] | None:
        """The target's status entry for ``vault``, or None before it has heard of it."""
        for v in self.status()["vaults"]:
            if v["vault"] == vault:
                return v
        return None

    def applied_seq(self, vault: str) -> int:
        v = self.vault_status(vault)
        return 0 if v is None or v["applied_seq"] is None else v["applied_seq"]


@contextlib.contextmanager
def serving(root: Path, secret_file: Path, *, workdir: Path | None = None, port: int = 0, name: str = "serve",
            start: bool = True) -> Iterator[Serve]:
    """An `octofs serve` on ``root`` (created if missing); on exit, always stopped.

    Args:
        root, secret_file: for ``--root`` and ``--secret-file``.
        workdir: where the log (``NAME.log``) and ready file go; default ``root``'s parent.
        port: 0 = any free port; give ``free_port()`` to know it before the first start.
        name: names the log and ready file (several targets in one test).
        start: start it before yielding (else the test calls ``start()``).
    """
    root.mkdir(parents=True, exist_ok=True)
    s = Serve(root, secret_file, workdir=workdir or root.parent, port=port, name=name)
    try:
        if start:
            s.start()
        yield s
    finally:
        s.cleanup()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
