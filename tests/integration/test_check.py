"""`octofs check VAULT.yaml` against real `octofs serve` processes (issue 8, done-means 2).

Each kind of problem gets its own line, message and exit code: unreachable (41), an
incompatible protocol version (42, a serve that speaks only version 2), a stale epoch
(43), a wrong secret (44), low space (46, a target root on a 2 MiB tmpfs), another vault
under the same name (48). A wrong certificate (47) is in test_tls.py. The probe is
read-only: it never supersedes a vault's live connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from octofs import replica as replica_mod
from tests.support.daemons import (
    REPO,
    free_port,
    mounted,
    run_octofs,
    serving,
    wait_until,
    write_vault_yaml,
)
from tests.support.trees import assert_trees_equal

VAULT = "sales"


@contextlib.contextmanager
def serve_speaking(versions: tuple[int, ...], root: Path, secret_file: Path, workdir: Path) -> Iterator[str]:
    """A real `octofs serve` whose protocol.SUPPORTED_VERSIONS is ``versions`` (a peer of another release)."""
    root.mkdir()
    ready = workdir / f"ready-v{'-'.join(map(str, versions))}.json"
    log_path = workdir / f"serve-v{'-'.join(map(str, versions))}.log"
    code = (f"import sys; import octofs.protocol as p; p.SUPPORTED_VERSIONS = {versions!r}; p.PROTOCOL_VERSION = max({versions!r}); "
            "from octofs.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--root", str(root), "--listen", "127.0.0.1:0",
                                 "--secret-file", str(secret_file), "--ready-file", str(ready)],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        yield json.loads(ready.read_text())["listen"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted by this test on ``path``; always unmounted."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "octofs-test-tmpfs", str(path)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, capture_output=True, timeout=30)


def plant_vault_state(root: Path, vault_id: bytes, epoch: int) -> None:
    """Target state as if a primary with ``vault_id`` had connected at ``epoch`` (FORMAT §7.9)."""
    sdir = replica_mod.vault_state_dir(root, VAULT)
    sdir.mkdir(parents=True)
    (sdir / "vault_id").write_text(vault_id.hex() + "\n")
    (sdir / "epoch").write_text(f"{epoch}\n")
    (root / VAULT).mkdir()


def check(vault_yaml: Path, *args: str) -> subprocess.CompletedProcess:
    return run_octofs("check", str(vault_yaml), *args, timeout=120)


def line_of(out: str, name: str) -> str:
    [line] = [ln for ln in out.splitlines() if ln.strip().startswith(f"{name} ")]
    return line


def test_check_reports_each_problem_with_its_own_message_and_exit_code(tmp_path: Path) -> None:
    secret, other_secret = tmp_path / "secret", tmp_path / "other-secret"
    secret.write_text("s3cret\n")
    other_secret.write_text("not-the-same\n")
    backing = tmp_path / "backing"
    backing.mkdir()
    (backing / "big").write_bytes(os.urandom(4 * 2**20))  # 4 MiB: does not fit the 2 MiB tmpfs target
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    vault_id = bytes(range(16))
    (state_dir / "vault_id").write_text(vault_id.hex() + "\n")
    (state_dir / "epoch").write_text("2\n")
    plant_vault_state(tmp_path / "root-stale", vault_id, 7)  # a failover happened: epoch 7 > ours (2)
    plant_vault_state(tmp_path / "root-other", bytes(16), 2)  # another vault id under the same name

    with contextlib.ExitStack() as stack:
        good = stack.enter_context(serving(tmp_path / "root-good", secret, name="good"))
        wrong = stack.enter_context(serving(tmp_path / "root-wrong", other_secret, name="wrong"))
        tiny_root = stack.enter_context(small_tmpfs(tmp_path / "tiny", "2m"))
        tiny = stack.enter_context(serving(tiny_root, secret, workdir=tmp_path, name="tiny"))
        stale = stack.enter_context(serving(tmp_path / "root-stale", secret, name="stale"))
        other = stack.enter_context(serving(tmp_path / "root-other", secret, name="other"))
        v2 = stack.enter_context(serve_speaking((2,), tmp_path / "root-v2", secret, tmp_path))
        targets = [
            {"name": "good", "address": good.address_str},
            {"name": "down", "address": f"127.0.0.1:{free_port()}"},  # nothing listens there
            {"name": "wrong", "address": wrong.address_str},
            {"name": "tiny", "address": tiny.address_str},
            {"name": "v2", "address": v2},
            {"name": "stale", "address": stale.address_str},
            {"name": "other", "address": other.address_str},
        ]
        vault_yaml = write_vault_yaml(tmp_path, name=VAULT, backing=backing,
                                      extra={"secret_file": str(secret), "targets": targets})

        full = check(vault_yaml)
        assert full.returncode == 41, full  # the first problem in file order: "down"
        out = full.stdout
        assert f"vault {VAULT}: " in out and "is valid" in out
        assert line_of(out, "good").split(": ", 1)[1].startswith("ok: protocol 1 (target speaks [1]")
        assert "free " in line_of(out, "good") and "vault not received yet" in line_of(out, "good")
        expected = {
            "down": (41, "UNREACHABLE: Cannot connect to down", "Connection refused"),
            "wrong": (44, "WRONG SECRET: Authentication with wrong", "does not know the shared secret"),
            "tiny": (46, "LOW SPACE: Target tiny", "has too little free space"),
            "v2": (42, "INCOMPATIBLE VERSION: Target v2", "the primary speaks [1], this target speaks [2]"),
            "stale": (43, "STALE EPOCH: Target stale", "has seen epoch 7, higher than this vault's 2"),
            "other": (48, "ANOTHER VAULT: Target other", "its recorded vault id differs"),
        }
        for name, (code, head, detail) in expected.items():
            line = line_of(out, name)
            assert head in line and detail in line, (name, line)
            alone = check(vault_yaml, "--target", name)
            assert alone.returncode == code, (name, alone)
            assert alone.stderr.startswith("octofs: error: ") and detail in alone.stderr, (name, alone.stderr)
            assert "Traceback" not in alone.stderr
        messages = {line_of(out, name).split(": ", 1)[1] for name in expected}
        assert len(messages) == len(expected)  # each its own message

        ok = check(vault_yaml, "--target", "good", "--json")
        assert ok.returncode == 0, ok
        doc = json.loads(ok.stdout)
        [row] = doc["targets"]
        assert row["ok"] and row["info"]["versions"] == [1] and row["info"]["vault_known"] is False
        assert row["info"]["free_bytes"] > 4 * 2**20 and doc["vault_bytes"] >= 4 * 2**20
        # The probe never touched the vault on the target: no replica dir, no recorded identity.
        assert not (tmp_path / "root-good" / VAULT).exists()
        assert not replica_mod.vault_state_dir(tmp_path / "root-good", VAULT).exists()
        assert "probe from" in good.log()


def test_check_reports_a_bad_file_like_any_command(tmp_path: Path) -> None:
    bad = tmp_path / "vault.yaml"
    bad.write_text("vault: x\nbacking: /nonexistent-octofs-dir\n")
    r = check(bad)
    assert r.returncode == 13 and "backing: directory /nonexistent-octofs-dir does not exist" in r.stderr


@pytest.mark.fuse
def test_probe_does_not_supersede_the_live_connection(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    with serving(tmp_path / "root", secret) as target:
        vault_yaml = write_vault_yaml(tmp_path, name=VAULT, extra={
            "secret_file": str(secret), "targets": [{"name": "t", "address": target.address_str}]})
        with mounted(vault_yaml) as m:
            (m.mnt / "f").write_bytes(b"x" * 10000)
            m.wait_synced()
            before = m.target_status("t")
            r = check(vault_yaml, "--json")
            assert r.returncode == 0, r
            info = json.loads(r.stdout)["targets"][0]["info"]
            assert info["vault_known"] and info["connected"] and info["consistent"]
            assert info["applied_seq"] == target.vault_status(VAULT)["applied_seq"] > 0
            (m.mnt / "g").write_bytes(b"y" * 10000)
            m.wait_synced()
            after = m.target_status("t")
            assert after["reconnects"] == before["reconnects"] and after["state"] == "connected"
            assert after["connected_since"] == before["connected_since"]
            assert_trees_equal(m.backing, tmp_path / "root" / VAULT)
        doc = yaml.safe_load(vault_yaml.read_text())
        assert doc["targets"][0]["name"] == "t"


@pytest.mark.fuse
@pytest.mark.parametrize("offered", [(2,), (1, 2)])
def test_negotiation_with_a_newer_peer(tmp_path: Path, offered: tuple[int, ...]) -> None:
    """FORMAT §7.10: a target of the next release (speaking (1, 2)) still works with this primary
    (version 1 is chosen) and replicates; one that dropped version 1 is refused, and both
    `octofs check` and the mount's status name both lists."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    with serve_speaking(offered, tmp_path / "root", secret, tmp_path) as address:
        vault_yaml = write_vault_yaml(tmp_path, name=VAULT, extra={
            "secret_file": str(secret), "targets": [{"name": "t", "address": address}]})
        r = check(vault_yaml)
        if offered == (1, 2):
            assert r.returncode == 0, r
            assert "ok: protocol 1 (target speaks [1, 2]" in r.stdout
        else:
            assert r.returncode == 42, r
            assert "the primary speaks [1], this target speaks [2]" in r.stderr
        with mounted(vault_yaml) as m:
            (m.mnt / "f").write_bytes(os.urandom(50000))
            if offered == (1, 2):
                m.wait_synced()
                assert_trees_equal(m.backing, tmp_path / "root" / VAULT)
            else:
                wait_until(lambda: "this target speaks [2]" in (m.target_status("t")["last_error"] or ""),
                           timeout=30, what="the version refusal in status")
                err = m.target_status("t")["last_error"]
                assert "refused the protocol version" in err and "the primary speaks [1]" in err
