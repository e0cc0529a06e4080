"""Automatic Switch Over (issue 7) with real processes in network namespaces the test creates.

A LAN of namespaces on one bridge (tests/support/netns.py): the primary (an octofs mount in
sync mode, its health responder, an HTTP server on a virtual address), the target (`octofs
serve` with a ``failover:`` entry whose hooks take the virtual address and start the same
HTTP server on the mounted replica), a client, and for the partition tests a witness (a
second `octofs serve` answering "do you see the primary?"). Processes that mount run under
``nsenter --net`` (not ``ip netns exec``, which would also give them a private mount
namespace), so the test sees and unmounts their mounts.

- done-means 1: SIGKILL the primary's processes and take its link down; the target takes
  over within the detection bound (measured, printed); the client gets every acked file
  from the same address, now served by the target; trees are identical.
- done-means 2 (first half) and fencing: the old primary comes back: it is refused for its
  stale epoch, goes read-only (EROFS), and both sides' status say who is primary at which epoch.
- done-means 3: a partition of only the primary–target link while the witness sees the
  primary: no takeover; the primary cut off from both: takeover.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from octofs import control, failover, paths
from octofs.errors import OctofsError
from octofs.replica import control_socket_path
from tests.support.daemons import (
    REPO,
    free_port,
    mounted,
    octofs_cmd,
    run_octofs,
    serving,
    wait_until,
    write_vault_yaml,
)
from tests.support.fuse import is_octofs_mounted, unmount, wait_for_ready
from tests.support.netns import Host, lan, require_netns
from tests.support.trees import assert_trees_equal

pytestmark = pytest.mark.fuse

HEARTBEAT_S = 0.5
HTTP_PORT = 8080

# A gratuitous ARP for argv[1] on interface argv[2], as arping -U does (not installed here):
# the client's neighbour entry for the virtual address moves to the new owner at once.
GARP = r"""
import socket, struct, sys
ip, itf = socket.inet_aton(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((itf, 0x0806))
mac = s.getsockname()[4]
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\0" * 6, ip)
for _ in range(3):
    s.send(b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp)
"""


def netns_cmd(host: Host, *argv: str) -> list[str]:
    """``argv`` in ``host``'s network namespace only (same mount namespace as the test)."""
    return ["nsenter", f"--net=/run/netns/{host.ns}", *argv]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@contextlib.contextmanager
def primary_mount(host: Host, vault_yaml: Path, mnt: Path) -> Iterator[subprocess.Popen]:
    mnt.mkdir(exist_ok=True)
    log_path = vault_yaml.parent / "mount.log"
    ready = vault_yaml.parent / "mount-ready.json"
    ready.unlink(missing_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(netns_cmd(host, *octofs_cmd("-v", "mount", "--foreground", "--ready-file",
                                                            str(ready), str(vault_yaml), str(mnt))),
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env())
    try:
        wait_for_ready(proc, ready, mnt, 30, log_path)
        yield proc
    finally:
        unmount(proc, mnt)
        if is_octofs_mounted(mnt):
            run_octofs("umount", str(mnt))  # a stale mount left by the SIGKILLed daemon


@contextlib.contextmanager
def serve(host: Host, workdir: Path, name: str, serve_yaml: dict) -> Iterator[subprocess.Popen]:
    root = Path(serve_yaml["root"])
    root.mkdir(exist_ok=True)
    path = workdir / f"serve-{name}.yaml"
    path.write_text(json.dumps(serve_yaml))
    ready = workdir / f"ready-{name}.json"
    log_path = workdir / f"serve-{name}.log"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(netns_cmd(host, *octofs_cmd("-v", "serve", str(path), "--ready-file", str(ready))),
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env(), cwd="/")
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, timeout=30, what=f"serve {name} ready")
        assert proc.poll() is None, f"serve {name} exited:\n{log_path.read_text()[-3000:]}"
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def target_vault(root: Path, vault: str) -> dict:
    reply = control.request(control_socket_path(root), "status")
    [entry] = [v for v in reply["vaults"] if v["vault"] == vault]
    return entry


def primary_status(state_dir: Path) -> dict:
    reply = control.request(paths.control_socket_path(state_dir), "status")
    assert reply.pop("ok"), reply
    return reply


def http_get(client: Host, url: str, timeout: float = 2.0) -> bytes | None:
    proc = subprocess.run(client.cmd("curl", "-sf", "--max-time", str(timeout), url), capture_output=True,
                          timeout=timeout + 10, check=False)
    return proc.stdout if proc.returncode == 0 else None


class Pair:
    """The files of one primary/target setup (vault ``web``)."""

    def __init__(self, tmp: Path, hosts: dict[str, Host], *, witness: bool, vip: str | None) -> None:
        self.tmp = tmp
        self.hosts = hosts
        self.vip = vip
        self.secret = tmp / "secret"
        self.secret.write_text("failover-test-secret\n")
        p = tmp / "p"
        p.mkdir()
        self.backing = p / "backing"
        self.backing.mkdir()
        self.state_dir = p / "state"
        self.mnt = p / "mnt"
        self.vault_yaml = p / "vault.yaml"
        primary, target = hosts["primary"], hosts["target"]
        self.vault_yaml.write_text(json.dumps({
            "vault": "web", "backing": str(self.backing), "state_dir": str(self.state_dir),
            "secret_file": str(self.secret),
            "targets": [{"name": "t", "address": f"{target.address}:7070", "mode": "sync", "sync_timeout": "30s"}],
            "failover": {"heartbeat": f"{HEARTBEAT_S}s", "health": f"{primary.address}:7071"},
        }))
        self.root = tmp / "t" / "root"
        self.root.parent.mkdir()
        self.takeover_mnt = tmp / "t" / "mnt"
        self.http_pids = tmp / "http.pids"
        hooks = []
        if vip is not None:
            hooks = [
                f"ip addr add {vip}/24 dev eth0",
                f"{sys.executable} -c '{GARP}' {vip} eth0",
                (f"cd / && nohup {sys.executable} -m http.server --bind {vip} --directory \"$OCTOFS_MOUNTPOINT\" "
                 f"{HTTP_PORT} >{tmp}/http-target.log 2>&1 & echo $! >> {self.http_pids}"),
            ]
        entry = {"vault": "web", "heartbeat": f"{HEARTBEAT_S}s", "primary": f"{primary.address}:7071",
                 "mount": str(self.takeover_mnt), "hooks": hooks, "hook_timeout": "20s"}
        if witness:
            entry["witness"] = f"{hosts['witness'].address}:7071"
        self.serve_yaml = {"root": str(self.root), "listen": "0.0.0.0:7070", "secret_file": str(self.secret),
                           "discovery": False, "failover": [entry]}
        self.witness_yaml = {"root": str(tmp / "w-root"), "listen": "0.0.0.0:7070", "secret_file": str(self.secret),
                             "discovery": False, "health": f"{hosts['witness'].address}:7071"} if witness else None

    def replica(self) -> Path:
        return self.root / "web"

    def cleanup(self) -> None:
        """Stop the HTTP servers the test (or its hooks) started, and the takeover mount."""
        with contextlib.suppress(FileNotFoundError):
            for line in self.http_pids.read_text().split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(line), signal.SIGKILL)
        for mnt in (self.takeover_mnt, self.mnt):  # mounts made by a takeover (octofs serve)
            if is_octofs_mounted(mnt):
                run_octofs("umount", str(mnt))

    def start_http_on_primary(self) -> subprocess.Popen:
        primary = self.hosts["primary"]
        subprocess.run(["ip", "-n", primary.ns, "addr", "add", f"{self.vip}/24", "dev", "eth0"], check=True)
        proc = subprocess.Popen(netns_cmd(primary, sys.executable, "-m", "http.server", "--bind", str(self.vip),
                                          "--directory", str(self.mnt), str(HTTP_PORT)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        with open(self.http_pids, "a") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def wait_takeover(self, timeout: float) -> dict:
        def done() -> dict | None:
            record = failover.load_record(self.root, "web")
            return record if record is not None and record.get("state") in ("primary", "failed") else None
        return wait_until(done, timeout=timeout, what="the takeover")


@pytest.fixture
def work() -> Iterator[Path]:
    """A short work dir: the takeover mount's control socket lives under ROOT/.octofs/vaults/NAME/primary/,
    and a Unix socket path may not exceed 107 bytes (pytest's tmp_path is too long for that)."""
    path = Path(tempfile.mkdtemp(prefix="ofo-", dir="/tmp"))
    yield path
    if not any(is_octofs_mounted(p) for p in path.glob("*/mnt")):
        shutil.rmtree(path, ignore_errors=True)


def write_acked(mnt: Path, name: str, data: bytes) -> None:
    """A file written and fsynced on the mount: in sync mode, acked by the target when this returns."""
    path = mnt / "data" / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_takeover_after_primary_dies_and_old_primary_is_fenced(work: Path) -> None:
    tmp_path = work
    require_netns()
    with lan(["primary", "target", "client"]) as hosts:
        vip = hosts["primary"].address.rsplit(".", 1)[0] + ".100"
        pair = Pair(tmp_path, hosts, witness=False, vip=vip)
        client = hosts["client"]
        url = f"http://{vip}:{HTTP_PORT}/data"
        try:
            with serve(hosts["target"], tmp_path, "target", pair.serve_yaml):
                acked: dict[str, bytes] = {}
                with primary_mount(hosts["primary"], pair.vault_yaml, pair.mnt) as mount_proc:
                    (pair.mnt / "data").mkdir()
                    http_proc = pair.start_http_on_primary()
                    for i in range(40):
                        data = os.urandom(1000 + 97 * i)
                        write_acked(pair.mnt, f"f{i:02d}", data)
                        acked[f"f{i:02d}"] = data
                    wait_until(lambda: http_get(client, f"{url}/f39") == acked["f39"], timeout=20,
                               what="the primary's HTTP service")
                    # Everything acked so far is on the target (sync mode: each fsync waited for its ack).
                    assert target_vault(pair.root, "web")["durable_seq"] == primary_status(
                        pair.state_dir)["journal"]["last_seq"]
                    # The failure: every process of the primary SIGKILLed, its link down.
                    http_proc.kill()
                    mount_proc.kill()
                    subprocess.run(["ip", "-n", hosts["primary"].ns, "link", "set", "eth0", "down"], check=True)
                    killed_at = time.time()
                    mount_proc.wait(timeout=10)
                    http_proc.wait(timeout=10)
                    record = pair.wait_takeover(timeout=30)
                    took_over_s = record["at"] - killed_at
                    answered = wait_until(lambda: http_get(client, f"{url}/f39", timeout=1.0), timeout=30,
                                          what="the service on the virtual address after the takeover")
                    serving_s = time.time() - killed_at
                    bound = failover.detection_bound(HEARTBEAT_S, False)
                    print(f"\nfailover: heartbeat {HEARTBEAT_S} s, detection bound {bound:.2f} s; takeover "
                          f"decided {took_over_s:.2f} s after the kill (silence measured by the target: "
                          f"{record['detection_s']:.2f} s); mount {record['mount']['duration_s']:.2f} s; "
                          f"service answering on {vip} {serving_s:.2f} s after the kill")
                    assert record["state"] == "primary", record
                    assert took_over_s <= bound + 0.5, (took_over_s, bound)
                    assert [h["rc"] for h in record["hooks"]] == [0, 0, 0], record["hooks"]
                    assert answered == acked["f39"]
                    for name, data in acked.items():  # everything acked before the failure
                        assert http_get(client, f"{url}/{name}") == data, name
                    # The replica is the primary's backing dir, exactly.
                    assert_trees_equal(pair.backing, pair.replica())
                    status = target_vault(pair.root, "web")
                    assert status["role"] == "primary" and status["epoch"] == 2, status
                    assert status["takeover"]["hooks"][0]["command"].startswith("ip addr add")
                    text = run_octofs("status", "--root", str(pair.root)).stdout
                    assert "taken over at epoch 2" in text and text.count("hook ok") == 3, text
                    # The new primary takes changes; its journal continues after the replica's seq.
                    new_state = failover.primary_state_dir(pair.root, "web")
                    new_status = primary_status(new_state)
                    assert new_status["epoch"] == 2 and new_status["fenced"] is None
                    assert new_status["journal"]["last_seq"] == record["seq"]
                    (pair.takeover_mnt / "data" / "after").write_bytes(b"written on the new primary")
                    assert http_get(client, f"{url}/after") == b"written on the new primary"
                    assert primary_status(new_state)["journal"]["last_seq"] > record["seq"]

                # The old primary comes back (stale mount cleaned, link up, remounted): it is fenced.
                subprocess.run(["ip", "-n", hosts["primary"].ns, "link", "set", "eth0", "up"], check=True)
                with primary_mount(hosts["primary"], pair.vault_yaml, pair.mnt):
                    # At once after the remount: the change waits for the first contact with the target,
                    # which refuses the stale epoch, so it fails; it never lands in the old primary only.
                    with pytest.raises(OSError) as err:
                        (pair.mnt / "data" / "late").write_bytes(b"must be refused")
                    assert err.value.errno == errno.EROFS
                    assert not (pair.backing / "data" / "late").exists()
                    fenced = primary_status(pair.state_dir)["fenced"]
                    assert fenced and "epoch" in fenced
                    st = primary_status(pair.state_dir)
                    assert st["epoch"] == 1 and st["targets"][0]["state"] == "fenced", st
                    assert "epoch" in (st["targets"][0]["last_error"] or "")
                    assert not (pair.replica() / "data" / "late").exists()
                    assert target_vault(pair.root, "web")["epoch"] == 2
                    out = run_octofs("status", str(pair.mnt))
                    assert "fenced" in out.stdout.lower(), out.stdout + out.stderr
                # Fenced across a remount too (persisted).
                with primary_mount(hosts["primary"], pair.vault_yaml, pair.mnt):
                    assert primary_status(pair.state_dir)["fenced"]
                    with pytest.raises(OSError) as err:
                        (pair.mnt / "data" / "late").write_bytes(b"x")
                    assert err.value.errno == errno.EROFS
        finally:
            pair.cleanup()


def _partition(a: Host, b: Host, on: bool) -> None:
    """Drop traffic between ``a`` and ``b`` only (blackhole routes both ways)."""
    verb = "add" if on else "del"
    subprocess.run(["ip", "-n", a.ns, "route", verb, "blackhole", f"{b.address}/32"], check=True)
    subprocess.run(["ip", "-n", b.ns, "route", verb, "blackhole", f"{a.address}/32"], check=True)


def test_witness_prevents_takeover_on_a_link_partition_and_allows_it_when_the_primary_is_gone(
        work: Path) -> None:
    tmp_path = work
    require_netns()
    with lan(["primary", "target", "witness"]) as hosts:
        pair = Pair(tmp_path, hosts, witness=True, vip=None)
        try:
            with serve(hosts["witness"], tmp_path, "witness", pair.witness_yaml), \
                    serve(hosts["target"], tmp_path, "target", pair.serve_yaml), \
                    primary_mount(hosts["primary"], pair.vault_yaml, pair.mnt):
                (pair.mnt / "data").mkdir()
                for i in range(10):
                    write_acked(pair.mnt, f"f{i}", os.urandom(5000))
                witness_log = tmp_path / "serve-witness.log"

                # 1. Only the primary–target link is cut; the witness still sees the primary.
                _partition(hosts["primary"], hosts["target"], True)
                wait_until(lambda: target_vault(pair.root, "web")["failover"]["state"] == "witness sees the primary",
                           timeout=30, what="the target consulting the witness")
                # Several rounds of the decision, each time the witness answering "I see it".
                wait_until(lambda: witness_log.read_text().count("answers (asked by") >= 3, timeout=30,
                           what="three witness rounds")
                status = target_vault(pair.root, "web")
                assert status["role"] == "target" and status["epoch"] == 1, status
                assert failover.load_record(pair.root, "web") is None
                assert primary_status(pair.state_dir)["fenced"] is None
                # The primary keeps working (sync mode degrades after its timeout; nothing is refused).
                _partition(hosts["primary"], hosts["target"], False)
                write_acked(pair.mnt, "after-heal", b"healed")
                wait_until(lambda: target_vault(pair.root, "web")["failover"]["state"] == "watching", timeout=30,
                           what="heartbeats again")

                # 2. The primary cut off from both: target and witness agree it is gone.
                subprocess.run(["ip", "-n", hosts["primary"].ns, "link", "set", "eth0", "down"], check=True)
                down_at = time.time()
                record = pair.wait_takeover(timeout=30)
                bound = failover.detection_bound(HEARTBEAT_S, True)
                print(f"\nfailover with witness: takeover decided {record['at'] - down_at:.2f} s after the link "
                      f"went down (bound {bound:.2f} s)")
                assert record["state"] == "primary", record
                assert record["at"] - down_at <= bound + 0.5
                assert "witness" in record["reason"]
                assert (pair.replica() / "data" / "after-heal").read_bytes() == b"healed"

                # The old primary (alive all along) is fenced once it reaches the target again.
                subprocess.run(["ip", "-n", hosts["primary"].ns, "link", "set", "eth0", "up"], check=True)
                wait_until(lambda: primary_status(pair.state_dir)["fenced"], timeout=30, what="fenced")
                with pytest.raises(OSError) as err:
                    (pair.mnt / "data" / "late").write_bytes(b"refused")
                assert err.value.errno == errno.EROFS
        finally:
            pair.cleanup()


def _symmetric(pair: Pair, work: Path, primary, target) -> Path:
    """Symmetric layout: the primary's backing dir is ROOT/web of its own serve root (returned), so that
    it can receive the vault back as a target; the target's takeover hands it back there."""
    p_root = work / "p" / "root"
    p_root.mkdir()
    pair.backing = p_root / "web"
    pair.backing.mkdir()
    doc = json.loads(pair.vault_yaml.read_text())
    doc["backing"] = str(pair.backing)
    pair.vault_yaml.write_text(json.dumps(doc))
    entry = pair.serve_yaml["failover"][0]
    entry["targets"] = [{"name": "back", "address": f"{primary.address}:7070"}]
    entry["health"] = f"{target.address}:7072"
    return p_root


def test_planned_failover_loses_no_write_and_the_old_primary_becomes_a_target(work: Path) -> None:
    """done-means 4: `octofs failover` on a healthy pair while a writer keeps writing."""
    require_netns()
    with lan(["primary", "target"]) as hosts:
        primary, target = hosts["primary"], hosts["target"]
        pair = Pair(work, hosts, witness=False, vip=None)
        p_root = _symmetric(pair, work, primary, target)
        pair.serve_yaml["health"] = f"{target.address}:7071"
        p_serve = {"root": str(p_root), "listen": "0.0.0.0:7070", "secret_file": str(pair.secret), "discovery": False}
        try:
            with serve(target, work, "target", pair.serve_yaml), serve(primary, work, "primary", p_serve), \
                    primary_mount(primary, pair.vault_yaml, pair.mnt):
                (pair.mnt / "data").mkdir()
                for i in range(20):
                    write_acked(pair.mnt, f"before{i}", os.urandom(3000))
                written: dict[str, bytes] = {}
                refused: list[int] = []

                def writer() -> None:
                    i = 0
                    while True:
                        data = os.urandom(500 + i)
                        try:
                            write_acked(pair.mnt, f"w{i:04d}", data)
                        except OSError as exc:
                            refused.append(exc.errno)
                            return
                        written[f"w{i:04d}"] = data
                        i += 1

                thread = threading.Thread(target=writer)
                thread.start()
                wait_until(lambda: len(written) >= 20, timeout=30, what="the writer under way")
                proc = subprocess.run(netns_cmd(primary, *octofs_cmd("failover", "--become-target", str(p_root),
                                                                      "--timeout", "30", str(pair.mnt))),
                                      capture_output=True, text=True, timeout=120, env=env(), check=False)
                thread.join(timeout=60)
                assert proc.returncode == 0, proc.stdout + proc.stderr
                assert "handed over" in proc.stdout and "epoch 2" in proc.stdout, proc.stdout
                print(f"\nplanned failover: {len(written)} writes acknowledged by the old primary, then "
                      f"{errno.errorcode.get(refused[0], refused[0]) if refused else 'nothing'}: {proc.stdout.strip()}")
                assert refused and refused[0] in (errno.EROFS, errno.ENOENT, errno.ENOTCONN), refused
                record = failover.load_record(pair.root, "web")
                assert record is not None and record["state"] == "primary" and record["planned"], record
                # Zero lost writes: every write the old primary acknowledged is on the new primary.
                for name, data in written.items():
                    assert (pair.takeover_mnt / "data" / name).read_bytes() == data, name
                assert not is_octofs_mounted(pair.mnt)
                # The old primary is a target now: it receives the new primary's changes, resuming after the
                # handed-over seq (no Synchronize needed), and ends identical.
                new_state = failover.primary_state_dir(pair.root, "web")
                (pair.takeover_mnt / "data" / "on-the-new-primary").write_bytes(b"new " * 1000)
                reply = control.request(paths.control_socket_path(new_state), "wait_synced", io_timeout_s=90,
                                        timeout_s=60)
                assert reply.get("synced"), reply
                assert_trees_equal(pair.replica(), pair.backing)
                new_status = primary_status(new_state)
                [back] = new_status["targets"]
                assert back["name"] == "back" and back["state"] == "connected", back
                assert back["synchronize"] is None, back  # resumed, nothing compared
                p_status = target_vault(p_root, "web")
                assert p_status["epoch"] == 2 and p_status["durable_seq"] == new_status["journal"]["last_seq"]
        finally:
            pair.cleanup()


def test_failback_sends_only_what_changed_and_switches_back(work: Path) -> None:
    """done-means 2: after a takeover, `octofs failback` brings the fenced old primary up to date (only the
    changed blocks cross the wire), the roles switch back, and both trees end identical."""
    require_netns()
    with lan(["primary", "target"]) as hosts:
        primary, target = hosts["primary"], hosts["target"]
        pair = Pair(work, hosts, witness=False, vip=None)
        p_root = _symmetric(pair, work, primary, target)
        # The old primary's own serve, for the way back: it takes the vault over again on request.
        p_serve = {"root": str(p_root), "listen": "0.0.0.0:7070", "secret_file": str(pair.secret), "discovery": False,
                   "health": f"{primary.address}:7073",
                   "failover": [{"vault": "web", "heartbeat": f"{HEARTBEAT_S}s", "primary": f"{target.address}:7072",
                                 "mount": str(pair.mnt), "health": f"{primary.address}:7071",
                                 "targets": [{"name": "t", "address": f"{target.address}:7070"}]}]}
        vault_bytes = 0
        try:
            with serve(target, work, "target", pair.serve_yaml):
                with primary_mount(primary, pair.vault_yaml, pair.mnt) as mount_proc:
                    (pair.mnt / "data").mkdir()
                    for i in range(8):
                        write_acked(pair.mnt, f"big{i}", os.urandom(1 << 20))
                        vault_bytes += 1 << 20
                    mount_proc.kill()
                    subprocess.run(["ip", "-n", primary.ns, "link", "set", "eth0", "down"], check=True)
                    mount_proc.wait(timeout=10)
                    record = pair.wait_takeover(timeout=30)
                    assert record["state"] == "primary", record
                # During the outage: one 4 KiB block changed, one small file added, on the new primary.
                with open(pair.takeover_mnt / "data" / "big3", "r+b") as f:
                    f.seek(12288)
                    f.write(b"O" * 4096)
                    os.fsync(f.fileno())
                (pair.takeover_mnt / "data" / "outage").write_bytes(b"written during the outage\n")
                subprocess.run(["ip", "-n", primary.ns, "link", "set", "eth0", "up"], check=True)
                with primary_mount(primary, pair.vault_yaml, pair.mnt):
                    wait_until(lambda: primary_status(pair.state_dir)["fenced"], timeout=30, what="fenced")
                    with serve(primary, work, "primary", p_serve):
                        new_state = failover.primary_state_dir(pair.root, "web")
                        bytes_seen: list[int] = []

                        def back_synchronized() -> bool:
                            with contextlib.suppress(OSError, OctofsError):  # its daemon ends after the handover
                                [back] = primary_status(new_state)["targets"]
                                bytes_seen.append(back["bytes_sent"])
                                return back["consistent"] is True
                            return False

                        proc = subprocess.Popen(
                            netns_cmd(primary, *octofs_cmd("failback", str(pair.vault_yaml), "--root", str(p_root),
                                                           "--from", f"{target.address}:7072",
                                                           "--to", f"{primary.address}:7073", "--timeout", "120")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
                        try:
                            wait_until(back_synchronized, timeout=120, what="the old primary synchronized")
                            out, err = proc.communicate(timeout=180)
                        finally:
                            if proc.poll() is None:
                                proc.kill()
                                proc.wait()
                        assert proc.returncode == 0, out + err
                        sent = bytes_seen[-1]
                        print(f"\nfailback: vault {vault_bytes:,} bytes, Synchronize sent {sent:,} bytes to the old "
                              f"primary; {out.strip()}")
                        assert sent < vault_bytes // 20, sent  # what changed (one block, one file), not the vault
                        # Roles switched back: the old primary's serve took over at epoch 3 and mounted the vault.
                        back_record = failover.load_record(p_root, "web")
                        assert back_record is not None and back_record["state"] == "primary", back_record
                        assert back_record["epoch"] == 3
                        wait_until(lambda: not is_octofs_mounted(pair.takeover_mnt), timeout=30,
                                   what="the other machine's mount gone")
                        t_status = target_vault(pair.root, "web")
                        assert t_status["role"] == "target" and "takeover" not in t_status, t_status
                        # The primary again: changes stream to the other machine, which ends identical.
                        p_state = failover.primary_state_dir(p_root, "web")
                        (pair.mnt / "data" / "after-failback").write_bytes(b"primary again\n")
                        reply = control.request(paths.control_socket_path(p_state), "wait_synced", io_timeout_s=90,
                                                timeout_s=60)
                        assert reply.get("synced"), (reply, primary_status(p_state)["targets"])
                        assert (pair.mnt / "data" / "outage").read_bytes() == b"written during the outage\n"
                        assert_trees_equal(pair.backing, pair.replica())
                        assert target_vault(pair.root, "web")["epoch"] == 3
                        # The other machine watches its new primary again (re-armed by the handback).
                        wait_until(lambda: target_vault(pair.root, "web")["failover"]["state"] == "watching",
                                   timeout=30, what="the watcher re-armed")
                        run_octofs("umount", str(pair.mnt))
        finally:
            pair.cleanup()


def test_watcher_warns_when_the_direct_query_cannot_reach_a_live_primary(work: Path) -> None:
    """A failover entry whose `primary` health address gets no answer while heartbeats flow is reported
    at once (status and log): otherwise a mere break of the replication link would cause a takeover."""
    secret = work / "secret"
    secret.write_text("s3cret\n")
    serve_yaml = work / "serve.yaml"
    serve_yaml.write_text(json.dumps({"secret_file": str(secret), "discovery": False, "failover": [
        {"vault": "vault", "heartbeat": "0.5s", "primary": f"127.0.0.1:{free_port()}", "mount": str(work / "tm")}]}))
    with serving(work / "root", secret, workdir=work, start=False) as srv:
        srv.start(extra_args=(str(serve_yaml),))
        vault_yaml = write_vault_yaml(work, extra={"secret_file": str(secret), "failover": {"heartbeat": "0.5s"},
                                                   "targets": [{"name": "t", "address": srv.address_str}]})
        with mounted(vault_yaml) as m:
            (m.mnt / "f").write_bytes(b"x")
            m.wait_synced()
            def warned() -> str | None:
                detail = ((srv.vault_status("vault") or {}).get("failover") or {}).get("detail") or ""
                return detail if "WARNING" in detail else None

            detail = wait_until(warned, timeout=30, what="the watcher's check of the direct query")
            assert "does not answer although the primary is alive" in detail
            assert srv.vault_status("vault")["failover"]["state"] == "watching"
            assert "does not answer although the primary is alive" in srv.log()
            srv.stop()  # before the primary goes: with no direct query, that would look like its death


def test_a_clean_unmount_is_not_taken_for_a_dead_primary(work: Path) -> None:
    """The primary says goodbye when it is unmounted: the watcher does not take over, whatever the direct
    query says; once the primary is back and connected, watching resumes."""
    secret = work / "secret"
    secret.write_text("s3cret\n")
    serve_yaml = work / "serve.yaml"
    serve_yaml.write_text(json.dumps({"secret_file": str(secret), "discovery": False, "failover": [
        {"vault": "vault", "heartbeat": "0.5s", "primary": f"127.0.0.1:{free_port()}", "mount": str(work / "tm")}]}))
    with serving(work / "root", secret, workdir=work, start=False) as srv:
        srv.start(extra_args=(str(serve_yaml),))
        vault_yaml = write_vault_yaml(work, extra={"secret_file": str(secret), "failover": {"heartbeat": "0.5s"},
                                                   "targets": [{"name": "t", "address": srv.address_str}]})
        with mounted(vault_yaml) as m:
            (m.mnt / "f").write_bytes(b"x")
            m.wait_synced()
        assert m.proc.returncode == 0
        state = wait_until(lambda: ((srv.vault_status("vault") or {}).get("failover") or {}).get("state")
                           == "primary stopped" and "stopped", timeout=30, what="the watcher to see the goodbye")
        assert state
        # Longer than the detection bound (silence + direct query): still no takeover.
        deadline = time.monotonic() + 3 * failover.detection_bound(0.5, False)
        while time.monotonic() < deadline:
            assert srv.vault_status("vault")["failover"]["state"] == "primary stopped", srv.vault_status("vault")
            assert failover.load_record(work / "root", "vault") is None
            time.sleep(0.2)  # sampling a state that must not change: no event to wait for
        assert "the primary stopped cleanly" in srv.log()
        with mounted(vault_yaml) as m:
            (m.mnt / "g").write_bytes(b"y")
            m.wait_synced()
            wait_until(lambda: srv.vault_status("vault")["failover"]["state"] != "primary stopped", timeout=30,
                       what="watching again")
            assert_trees_equal(m.backing, work / "root" / "vault", mtime=True)
            srv.stop()  # before the primary goes (its direct query is not answered in this setup)

