"""TLS on the replication link (issue 8, done-means 4 and the certificate part of done-means 2).

- `octofs keygen` makes a key (0600) and a self-signed certificate; its fingerprint is openssl's.
- `octofs check` over TLS: the pinned certificate passes; a wrong pin, TLS on one side only, a missing
  or untrusted client certificate are each refused with their own message (exit 47; 40 for a plain
  primary at a TLS-only target, which cannot tell more than "closed during the handshake").
- A real mount replicates over TLS (pinned, with a client certificate checked by the target's ca:);
  with a wrong pin it replicates nothing and says why in status.
- In two network namespaces, tcpdump on the link sees a marker written into the vault in cleartext
  with TLS off, and not with TLS on.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.daemons import (
    Serve,
    mounted,
    run_octofs,
    wait_until,
    write_vault_yaml,
)
from tests.support.netns import lan, require_netns
from tests.support.trees import assert_trees_equal
from tests.support.wan import capture, primary_mount, serve_in

VAULT = "sales"


def keygen(directory: Path, name: str) -> tuple[Path, Path, str]:
    r = run_octofs("keygen", str(directory), "--name", name)
    assert r.returncode == 0, r
    fingerprint = r.stdout.split("fingerprint: ")[1].split()[0]
    return directory / f"{name}.crt", directory / f"{name}.key", fingerprint


@contextlib.contextmanager
def tls_serve(tmp_path: Path, name: str, tls: dict | None, secret: Path) -> Iterator[Serve]:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"tls": tls} if tls else {}))
    s = Serve(tmp_path / f"root-{name}", secret, workdir=tmp_path, name=name)
    s.root.mkdir()
    try:
        s.start(extra_args=(str(cfg),))
        yield s
    finally:
        s.cleanup()


def test_keygen(tmp_path: Path) -> None:
    cert, key, fingerprint = keygen(tmp_path, "backup1")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"],
                         capture_output=True, text=True, check=True).stdout
    assert fingerprint == "sha256:" + out.split("=")[1].strip().replace(":", "").lower()
    again = run_octofs("keygen", str(tmp_path), "--name", "backup1")
    assert again.returncode == 2 and "exists already" in again.stderr
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # not overwritten, still a key


def test_check_over_tls_and_every_certificate_problem(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    t_cert, t_key, t_fp = keygen(tmp_path, "target")
    p_cert, p_key, p_fp = keygen(tmp_path, "primary")
    x_cert, x_key, _ = keygen(tmp_path, "stranger")
    with contextlib.ExitStack() as stack:
        tls_target = stack.enter_context(tls_serve(tmp_path, "tlsonly", {"cert": str(t_cert), "key": str(t_key)},
                                                   secret))
        plain = stack.enter_context(tls_serve(tmp_path, "plain", None, secret))
        mutual = stack.enter_context(tls_serve(tmp_path, "mutual", {"cert": str(t_cert), "key": str(t_key),
                                                                    "ca": str(p_cert)}, secret))

        def check(address: str, tls: dict | None) -> subprocess.CompletedProcess:
            target = {"name": "t", "address": address, **({"tls": tls} if tls else {})}
            vault_yaml = write_vault_yaml(tmp_path, name=VAULT, extra={"secret_file": str(secret),
                                                                       "targets": [target]})
            return run_octofs("check", str(vault_yaml))

        ok = check(tls_target.address_str, {"fingerprint": t_fp})
        assert ok.returncode == 0, ok
        assert "ok: protocol 1" in ok.stdout and "TLS, certificate pinned sha256:" in ok.stdout
        # The same pin in openssl's notation (upper case, colons) is the same pin.
        colons = "SHA256:" + ":".join(t_fp[7:][i:i + 2] for i in range(0, 64, 2)).upper()
        assert check(tls_target.address_str, {"fingerprint": colons}).returncode == 0
        by_ca = check(tls_target.address_str, {"ca": str(t_cert)})
        assert by_ca.returncode == 0 and "checked against" in by_ca.stdout, by_ca

        cases = [
            (tls_target, {"fingerprint": p_fp}, 47,
             f"the target's certificate {t_fp} is not the pinned {p_fp}"),
            (tls_target, {"ca": str(p_cert)}, 47, "the peer's certificate is not trusted by the CA file"),
            (plain, {"fingerprint": t_fp}, 47, "the peer does not speak TLS"),
            (tls_target, None, 40, "closed the connection during the handshake (does it accept only TLS?"),
            (mutual, {"fingerprint": t_fp}, 47, "the target requires a client certificate"),
            (mutual, {"fingerprint": t_fp, "cert": str(x_cert), "key": str(x_key)}, 47,
             "the peer refused our certificate"),
        ]
        messages = set()
        for serve, tls, code, text in cases:
            r = check(serve.address_str, tls)
            assert r.returncode == code and text in r.stderr, (tls, r)
            assert "Traceback" not in r.stderr
            messages.add(r.stderr.splitlines()[0])
        assert len(messages) == len(cases)
        good = check(mutual.address_str, {"fingerprint": t_fp, "cert": str(p_cert), "key": str(p_key)})
        assert good.returncode == 0, good
        assert "TLS handshake failed" in tls_target.log() and "TLS handshake failed" in mutual.log()


def test_tls_config_mistakes_are_config_errors(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    t_cert, t_key, _ = keygen(tmp_path, "target")
    for tls, text in [
        ({"cert": str(t_cert), "key": str(t_key)}, "targets[0].tls.fingerprint: give the target's certificate"),
        ({"fingerprint": "abc"}, "expected a SHA-256 fingerprint"),
        ({"fingerprint": "a" * 64, "cert": str(t_cert)}, "cert and key go together"),
        ({"ca": str(tmp_path / "nope.crt")}, "does not exist"),
    ]:
        vault_yaml = write_vault_yaml(tmp_path, name=VAULT, extra={
            "secret_file": str(secret), "targets": [{"name": "t", "address": "127.0.0.1:1", "tls": tls}]})
        r = run_octofs("check", str(vault_yaml))
        assert r.returncode == 13 and text in r.stderr, (tls, r)
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump({"tls": {"fingerprint": "a" * 64}}))
    r = run_octofs("serve", str(bad), "--root", str(tmp_path), "--secret-file", str(secret))
    assert r.returncode == 13 and "tls.fingerprint: a target checks primaries by ca:" in r.stderr, r


@pytest.mark.fuse
def test_replication_over_tls_and_a_wrong_pin(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    t_cert, t_key, t_fp = keygen(tmp_path, "target")
    p_cert, p_key, p_fp = keygen(tmp_path, "primary")
    with tls_serve(tmp_path, "t", {"cert": str(t_cert), "key": str(t_key), "ca": str(p_cert)}, secret) as target:
        (tmp_path / "a").mkdir()
        vault_yaml = write_vault_yaml(tmp_path / "a", name=VAULT, extra={"secret_file": str(secret), "targets": [
            {"name": "t", "address": target.address_str,
             "tls": {"fingerprint": t_fp, "cert": str(p_cert), "key": str(p_key)}}]})
        with mounted(vault_yaml) as m:
            for i in range(20):
                (m.mnt / f"f{i}").write_bytes(os.urandom(30000))
            os.mkdir(m.mnt / "d")
            (m.mnt / "d" / "x").write_text("hello over TLS\n")
            m.wait_synced()
            st = m.target_status("t")
            assert st["tls"] is True and st["state"] == "connected" and st["last_error"] is None
            assert_trees_equal(m.backing, target.root / VAULT)

        # Another vault pinned to the wrong certificate: nothing is replicated, status says why.
        (tmp_path / "b").mkdir()
        vault_b = write_vault_yaml(tmp_path / "b", name="other", extra={"secret_file": str(secret), "targets": [
            {"name": "t", "address": target.address_str,
             "tls": {"fingerprint": p_fp, "cert": str(p_cert), "key": str(p_key)}}]})
        with mounted(vault_b) as m:
            (m.mnt / "secret-data").write_text("must not leave\n")
            err = wait_until(lambda: m.target_status("t")["last_error"], timeout=30, what="a TLS error in status")
            assert f"is not the pinned {p_fp}" in err, err
            assert m.target_status("t")["acked_seq"] == 0
        assert not (target.root / "other").exists()


def test_tls_hides_the_ops_on_the_wire(tmp_path: Path) -> None:
    """Done-means 4: a marker written into the vault crosses the link in cleartext without TLS, not with it."""
    require_netns()
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    t_cert, t_key, t_fp = keygen(tmp_path, "target")
    port = 7070
    seen = {}
    with lan(["primary", "target"]) as hosts:
        for tls in (False, True):
            marker = b"OCTOFS-MARKER-" + secrets.token_hex(12).encode()
            work = tmp_path / ("tls" if tls else "plain")
            work.mkdir()
            serve_yaml = {"root": str(work / "root"), "listen": f"{hosts['target'].address}:{port}",
                          "secret_file": str(secret), "discovery": False}
            target = {"name": "t", "address": f"{hosts['target'].address}:{port}", "compress": "none"}
            if tls:
                serve_yaml["tls"] = {"cert": str(t_cert), "key": str(t_key)}
                target["tls"] = {"fingerprint": t_fp}
            vault_yaml = write_vault_yaml(work, name=VAULT, extra={"secret_file": str(secret), "targets": [target]})
            with serve_in(hosts["target"], work, "serve", serve_yaml), \
                    capture(hosts["target"], port, work / "link.pcap") as cap, \
                    primary_mount(hosts["primary"], vault_yaml, work / "mnt") as m:
                (m.mnt / "file-with-marker").write_bytes(b"before " + marker + b" after\n" * 3)
                m.wait_synced()
                assert m.target_status("t")["tls"] is tls
                assert_trees_equal(m.backing, work / "root" / VAULT)
                assert marker in (work / "root" / VAULT / "file-with-marker").read_bytes()
            assert len(cap.data) > 1000, "tcpdump captured nothing"
            seen[tls] = marker in cap.data
    assert seen == {False: True, True: False}, seen
