"""SERVE.yaml `failover:` / `health:` and vault.yaml `failover.health` (docs/VAULT_YAML.md): values and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from octofs.config import load_serve_config, load_vault_config
from octofs.errors import ConfigValueError


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "root").mkdir()
    (tmp_path / "secret").write_text("s\n")
    return tmp_path


def serve(here: Path, body: str):
    (here / "serve.yaml").write_text(f"root: root\nsecret_file: secret\n{body}")
    return load_serve_config("serve.yaml")


def test_failover_entry_with_defaults_and_every_key(here: Path) -> None:
    cfg = serve(here, """health: 10.0.0.2
takeover_hooks: [echo default]
failover:
  - vault: web
    primary: 10.0.0.1
    mount: mnt
  - vault: db
    primary: "[fd00::1]:9000"
    witness: 10.0.0.3:7075
    heartbeat: 500ms
    mount: /srv/db
    hooks: [a, b]
    hook_timeout: 5s
    health: 0.0.0.0:7072
    targets: [{name: back, address: 10.0.0.1:7070}]
""")
    assert cfg.health == ("10.0.0.2", 7071)
    web, db = cfg.failover
    assert (web.vault, web.primary, web.witness, web.heartbeat_s) == ("web", ("10.0.0.1", 7071), None, 15.0)
    assert web.mount == here / "mnt" and web.hooks == ("echo default",) and web.hook_timeout_s == 60.0
    assert db.primary == ("fd00::1", 9000) and db.witness == ("10.0.0.3", 7075) and db.heartbeat_s == 0.5
    assert db.hooks == ("a", "b") and db.hook_timeout_s == 5.0 and db.health == ("0.0.0.0", 7072)
    assert db.targets == (("back", "10.0.0.1", 7070),)


@pytest.mark.parametrize(("body", "message"), [
    ("failover:\n  - vault: web\n    mount: m\n", "serve.yaml:4: failover[0].primary: required key is missing"),
    ("failover:\n  - vault: web\n    primary: 10.0.0.1\n", "failover[0].mount"),
    ("failover:\n  - {vault: web, primary: 'a:b', mount: m}\n", "failover[0].primary: expected HOST:PORT"),
    ("failover:\n  - {vault: web, primary: x, mount: m}\n  - {vault: web, primary: y, mount: m}\n",
     "listed twice"),
    ("failover:\n  - {vault: web, primary: x, mount: m, heartbeat: 0s}\n", "failover[0].heartbeat"),
    ("failover:\n  - {vault: web, primary: x, mount: m, wat: 1}\n", "failover[0]"),
    ("failover: {vault: web}\n", "failover"),
])
def test_failover_mistakes_are_one_line(here: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigValueError) as info:
        serve(here, body)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_failover_needs_the_secret(here: Path) -> None:
    (here / "serve.yaml").write_text("root: root\nfailover:\n  - {vault: web, primary: x, mount: m}\n")
    with pytest.raises(ConfigValueError, match="needs secret_file"):
        load_serve_config("serve.yaml")


def test_vault_failover_health(here: Path) -> None:
    (here / "data").mkdir()
    (here / "vault.yaml").write_text("vault: v\nbacking: data\nsecret_file: secret\n"
                                     "failover: {heartbeat: 2s, health: 10.0.0.1}\n")
    cfg = load_vault_config("vault.yaml")
    assert cfg.health == ("10.0.0.1", 7071) and cfg.heartbeat_s == 2.0
    (here / "vault.yaml").write_text("vault: v\nbacking: data\nfailover: {health: 10.0.0.1:7000}\n")
    with pytest.raises(ConfigValueError, match="failover.health: needs secret_file"):
        load_vault_config("vault.yaml")
