"""config.py's operations keys: `metrics:` (vault.yaml and SERVE.yaml), SERVE.yaml `name:` and `discovery:`,
and their `octofs serve` flags (`--metrics`, `--name`, `--no-discovery`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from octofs.config import load_serve_config, load_vault_config
from octofs.errors import ConfigValueError, UsageError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def vault(here: Path, extra: str) -> Path:
    path = here / "vault.yaml"
    path.write_text("vault: sales\nbacking: data\n" + extra)
    return Path("vault.yaml")  # relative: messages name the file as given


@pytest.mark.parametrize(("text", "expected"), [
    ("", None),
    ("metrics:\n", None),
    ("metrics: off\n", None),
    ('metrics: "off"\n', None),
    ("metrics: 127.0.0.1:9108\n", ("127.0.0.1", 9108)),
    ("metrics: 127.0.0.1\n", ("127.0.0.1", 9108)),
    ('metrics: ":9200"\n', ("0.0.0.0", 9200)),
    ('metrics: "[::1]:0"\n', ("::1", 0)),
    ("metrics: localhost:9999\n", ("localhost", 9999)),
])
def test_vault_metrics(here: Path, text: str, expected) -> None:
    assert load_vault_config(vault(here, text)).metrics == expected


@pytest.mark.parametrize(("text", "message"), [
    ("metrics: on\n", "vault.yaml:3: metrics: expected HOST:PORT such as 127.0.0.1:9108, or off, got boolean true"),
    ("metrics: 9108\n", "vault.yaml:3: metrics: expected HOST:PORT such as 127.0.0.1:9108, or off, got integer 9108"),
    ("metrics: x:y\n", "vault.yaml:3: metrics: expected HOST:PORT, got 'x:y'"),
    ("metrics: 127.0.0.1:70000\n", ("vault.yaml:3: metrics: expected HOST:PORT with a port from 0 to 65535, "
                                   "got '127.0.0.1:70000'")),
    ("metrics: [1, 2]\n", "vault.yaml:3: metrics: expected HOST:PORT, or off, got a list"),
])
def test_vault_metrics_mistakes_name_file_line_and_key(here: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigValueError) as info:
        load_vault_config(vault(here, text))
    assert str(info.value) == message
    assert info.value.exit_code == 13


def test_serve_keys_and_flags(here: Path) -> None:
    (here / "serve.yaml").write_text("root: data\nname: backup1\ndiscovery: off\nmetrics: 127.0.0.1:9109\n")
    cfg = load_serve_config("serve.yaml")
    assert (cfg.name, cfg.discovery, cfg.metrics) == ("backup1", False, ("127.0.0.1", 9109))
    cfg = load_serve_config("serve.yaml", name="other", metrics="127.0.0.2:0")
    assert (cfg.name, cfg.discovery, cfg.metrics) == ("other", False, ("127.0.0.2", 0))
    flags_only = load_serve_config(None, root="data")
    assert (flags_only.name, flags_only.discovery, flags_only.metrics) == (None, True, None)
    assert load_serve_config(None, root="data", discovery=False).discovery is False


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "-x"}, "--name: expected 1-64 letters"),
    ({"metrics": "a:b"}, "--metrics: expected HOST:PORT, got 'a:b'"),
])
def test_serve_bad_flags_are_usage_errors(here: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError) as info:
        load_serve_config(None, root="data", **kwargs)
    assert message in str(info.value)


def test_serve_yaml_bad_name(here: Path) -> None:
    (here / "serve.yaml").write_text("root: data\nname: ../x\n")
    with pytest.raises(ConfigValueError, match=r"^serve.yaml:2: name: expected 1-64 letters"):
        load_serve_config("serve.yaml")


def test_cli_reports_a_bad_metrics_key_in_one_line(here: Path) -> None:
    vault(here, "metrics: nope:port\n")
    (here / "mnt").mkdir()
    result = subprocess.run([sys.executable, "-m", "octofs", "mount", "vault.yaml", "mnt"], capture_output=True,
                            text=True, timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 13
    assert result.stderr == "octofs: error: vault.yaml:3: metrics: expected HOST:PORT, got 'nope:port'\n"
