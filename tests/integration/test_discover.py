"""`octofs discover` on a LAN of network namespaces (issue 8, done-means 1).

Three `octofs serve` in three namespaces on one bridge, a fourth namespace as the
client: `octofs discover` there finds the two that answer and not the third, which
has `discovery: off` in its SERVE.yaml (and is reachable, so its absence is the
setting, not the network). Garbage datagrams sent to a target are dropped with a
DEBUG line, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from octofs import __version__, discovery
from tests.support.daemons import REPO
from tests.support.netns import Host, lan, require_netns


@contextlib.contextmanager
def serve_in(host: Host, workdir: Path, name: str, *args: str) -> Iterator[subprocess.Popen]:
    """`octofs serve` inside ``host``'s namespace; on exit, stopped (SIGTERM, then SIGKILL) and reaped."""
    root = workdir / f"root-{name}"
    root.mkdir()
    ready = workdir / f"ready-{name}.json"
    log_path = workdir / f"serve-{name}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            host.cmd(sys.executable, "-m", "octofs", "serve", "--root", str(root), "--secret-file",
                     str(workdir / "secret"), "--ready-file", str(ready), *args),
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, f"serve {name} exited with {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"serve {name} not ready:\n{log_path.read_text()}"
            time.sleep(0.02)
        assert json.loads(ready.read_text())["pid"] == proc.pid
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def run_in(host: Host, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(host.cmd(*argv), check=False, capture_output=True, text=True, timeout=timeout, env=env)


# Sends one query to argv[1] only (the multicast group, or a broadcast address) from interface argv[2],
# and prints the name of each valid answer to it within 1.5 s.
ONE_PATH_PROBE = """
import os, select, socket, sys, time
from octofs import discovery
nonce = os.urandom(8)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[2]))
s.bind(("", 0))
s.sendto(discovery.encode_query(discovery.Query(nonce)), (sys.argv[1], discovery.PORT))
end = time.monotonic() + 1.5
while (left := end - time.monotonic()) > 0:
    if select.select([s], [], [], left)[0]:
        a = discovery.decode_answer(s.recv(2048))
        assert a.nonce == nonce
        print(a.name)
"""


def fingerprint(workdir: Path, name: str) -> str:
    return (workdir / f"root-{name}" / ".octofs" / "fingerprint").read_text().strip()


def test_discover_finds_the_two_that_answer_and_not_the_one_with_discovery_off(tmp_path: Path) -> None:
    require_netns()
    (tmp_path / "secret").write_text("s3cret\n")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"discovery": False, "name": "gamma"}))
    with lan(["a", "b", "c", "client"]) as hosts:
        a, b, c, client = hosts["a"], hosts["b"], hosts["c"], hosts["client"]
        with (
            # a listens on every address (its answer leaves the host empty: the client
            # uses the address the answer came from); b on its LAN address only.
            serve_in(a, tmp_path, "a", "--listen", "0.0.0.0:7070", "--name", "alpha", "--debug-module", "beacon"),
            serve_in(b, tmp_path, "b", "--listen", f"{b.address}:7070", "--name", "beta"),
            serve_in(c, tmp_path, "c", str(tmp_path / "c.yaml"), "--listen", f"{c.address}:7070"),
        ):
            # Garbage first: a's responder must drop it and keep answering.
            garbage = [b"", b"\x00" * 40, b"hello", b"\xc1", discovery.encode_query(discovery.Query(b"x" * 8))[:-3],
                       b"\x82\xa5magic\xafoctofs-discover\xa1v\x02", b"\xff" * 2000]
            probe = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                     "for d in sys.argv[2:]: s.sendto(bytes.fromhex(d),(sys.argv[1],7070))\n")
            sent = run_in(client, sys.executable, "-c", probe, a.address, *[g.hex() for g in garbage])
            assert sent.returncode == 0, sent.stderr

            result = run_in(client, sys.executable, "-m", "octofs", "discover", "--json", "--timeout", "1.5")
            assert result.returncode == 0, result.stderr
            found = json.loads(result.stdout)["targets"]
            assert sorted((t["name"], t["address"]) for t in found) == [
                ("alpha", f"{a.address}:7070"), ("beta", f"{b.address}:7070")], found
            by_name = {t["name"]: t for t in found}
            assert by_name["alpha"]["fingerprint"] == fingerprint(tmp_path, "a")
            assert by_name["beta"]["fingerprint"] == fingerprint(tmp_path, "b")
            assert by_name["alpha"]["fingerprint"] != by_name["beta"]["fingerprint"]
            for t in found:
                assert t["version"] == __version__ and t["protocols"] == [1], t
            # The shared secret appears nowhere in what was sent.
            assert "s3cret" not in result.stdout

            # gamma is up and reachable from the client: not found only because discovery is off.
            reach = run_in(client, sys.executable, "-c",
                           f"import socket; socket.create_connection(({c.address!r}, 7070), timeout=5).close()")
            assert reach.returncode == 0, reach.stderr
            assert not (tmp_path / "root-c" / ".octofs" / "fingerprint").exists()

            # Each path on its own (the command sends both, so one could hide a broken other).
            for dest in (discovery.MULTICAST_GROUP, "10.213.{}.255".format(client.address.split(".")[2])):
                got = run_in(client, sys.executable, "-c", ONE_PATH_PROBE, dest, client.address)
                assert got.returncode == 0, got.stderr
                assert sorted(got.stdout.split()) == ["alpha", "beta"], (dest, got.stdout)

            table = run_in(client, sys.executable, "-m", "octofs", "discover", "--timeout", "1")
            assert table.returncode == 0, table.stderr
            assert "alpha" in table.stdout and "beta" in table.stdout and "gamma" not in table.stdout

        logs = {n: (tmp_path / f"serve-{n}.log").read_text() for n in "abc"}
    assert "ignoring a datagram" in logs["a"], logs["a"]
    assert "answered a discovery query" in logs["a"]
    for text in logs.values():
        assert "Traceback" not in text, text
    assert "discovery is off" in logs["c"]


def test_discover_with_nobody_there_says_so(tmp_path: Path) -> None:
    require_netns()
    with lan(["client"]) as hosts:
        result = run_in(hosts["client"], sys.executable, "-m", "octofs", "discover", "--timeout", "0.5")
    assert result.returncode == 0, result.stderr
    assert "no octofs serve answered within 0.5 s" in result.stdout


def test_discover_rejects_a_bad_timeout() -> None:
    result = subprocess.run([sys.executable, "-m", "octofs", "discover", "--timeout", "0"], check=False,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.returncode == 2
    assert "--timeout: expected seconds from 0 to 600" in result.stderr
    assert "Traceback" not in result.stderr




def test_lan_teardown_removes_every_namespace_even_after_a_failure() -> None:
    require_netns()
    seen: list[str] = []
    try:
        with lan(["x", "y"]) as hosts:
            seen = [h.ns for h in hosts.values()]
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
            assert all(ns in listed for ns in seen)
            raise RuntimeError("the test body failed")
    except RuntimeError as exc:
        assert str(exc) == "the test body failed"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert len(seen) == 2 and not any(ns in listed for ns in seen), listed
    assert seen[0].rsplit("-", 1)[0] + "-br" not in listed
