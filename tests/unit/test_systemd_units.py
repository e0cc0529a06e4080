"""docs/systemd/*.service: well-formed units whose commands are real octofs subcommands and flags (so they cannot rot)."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from octofs.cli import build_parser

UNITS = Path(__file__).resolve().parents[2] / "docs" / "systemd"
INSTANCE = "sales"
EXEC_KEYS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecStop", "ExecStopPost", "ExecReload")


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections → (key, value) in order; systemd allows a key more than once (Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}:{n}: no line continuations, please"
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}:{n}: {line}"
            current = line[1:-1]
            assert current not in sections, f"{path.name}:{n}: section [{current}] twice"
            sections[current] = []
            continue
        assert current is not None, f"{path.name}:{n}: key before any section"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z]+", key), f"{path.name}:{n}: not KEY=VALUE: {line}"
        sections[current].append((key, value))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def expand(text: str, env: dict[str, str]) -> str:
    """The systemd specifier %i and ${VAR} references (as ExecStart= expands them)."""
    text = text.replace("%i", INSTANCE).replace("%%", "%")
    assert "%" not in text, f"unexpected specifier in {text!r}"
    return re.sub(r"\$\{([A-Za-z_]+)\}", lambda m: env[m.group(1)], text)


def environment(unit: dict) -> dict[str, str]:
    env = {}
    for value in values(unit, "Service", "Environment"):
        for item in shlex.split(value):
            k, _, v = item.partition("=")
            env[k] = expand(v, env)
    return env


def octofs_commands(unit: dict) -> list[tuple[str, list[str]]]:
    """(Exec key, argv after the executable) of every Exec line that runs octofs."""
    env = environment(unit)
    out = []
    for key in EXEC_KEYS:
        for value in values(unit, "Service", key):
            argv = shlex.split(expand(value.lstrip("-@:+!"), env))
            assert argv[0].startswith("/"), f"{key}: systemd wants an absolute executable, got {argv[0]}"
            if Path(argv[0]).name == "octofs":
                out.append((key, argv[1:]))
    return out


def parse_cli(argv: list[str]):
    """Parse as `octofs` would; argparse's exit on an unknown command or flag fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`octofs {shlex.join(argv)}` is not a valid command line (argparse exit {exc.code})")


def unit_files() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


def test_the_two_units_exist() -> None:
    assert [p.name for p in unit_files()] == ["octofs-mount@.service", "octofs-serve@.service"]


@pytest.mark.parametrize("path", unit_files(), ids=lambda p: p.name)
def test_unit_is_well_formed_ini(path: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string(path.read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    unit = read_unit(path)
    assert values(unit, "Service", "Type") == ["notify"]  # octofs sends READY=1 (octofs/sdnotify.py)
    assert values(unit, "Service", "NotifyAccess") == ["main"]
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]
    assert len(values(unit, "Service", "ExecStart")) == 1


def test_serve_unit_runs_serve_on_the_instance_file() -> None:
    unit = read_unit(UNITS / "octofs-serve@.service")
    [(key, argv)] = octofs_commands(unit)
    assert key == "ExecStart"
    args = parse_cli(argv)
    assert args.command == "serve"
    assert args.serve_yaml == f"/etc/octofs/serve/{INSTANCE}.yaml"
    assert [expand(v, {}) for v in values(unit, "Unit", "ConditionPathExists")] == [args.serve_yaml]


def test_mount_unit_mounts_in_the_foreground_and_unmounts_on_stop() -> None:
    unit = read_unit(UNITS / "octofs-mount@.service")
    env = environment(unit)
    assert env == {"VAULT_YAML": f"/etc/octofs/vaults/{INSTANCE}.yaml", "MOUNTPOINT": f"/srv/octofs/{INSTANCE}"}
    commands = dict(octofs_commands(unit))
    assert set(commands) == {"ExecStart", "ExecStop"}
    start = parse_cli(commands["ExecStart"])
    assert start.command == "mount" and start.foreground is True  # systemd supervises the daemon itself
    assert (start.vault_yaml, start.mountpoint) == (env["VAULT_YAML"], env["MOUNTPOINT"])
    stop = parse_cli(commands["ExecStop"])
    assert stop.command == "umount" and stop.mountpoint == env["MOUNTPOINT"]
    assert [expand(v, {}) for v in values(unit, "Unit", "ConditionPathExists")] == [env["VAULT_YAML"]]


def test_every_octofs_flag_in_the_units_is_documented_in_its_help() -> None:
    """A flag hidden from --help (like mount's internal --log-file) is not for units."""
    for path in unit_files():
        for _, argv in octofs_commands(read_unit(path)):
            help_text = subprocess.run([sys.executable, "-m", "octofs", argv[0], "--help"], capture_output=True,
                                       text=True, check=True, timeout=60,
                                       env={**os.environ, "PYTHONPATH": str(UNITS.parents[1])}).stdout
            for flag in (a for a in argv if a.startswith("--")):
                assert flag in help_text, f"{path.name}: {flag} is not in `octofs {argv[0]} --help`"


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """systemd's own parser, offline, on instances of both templates (octofs path swapped for a real one)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (Debian: systemd)"
    shim = tmp_path / "octofs"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m octofs \"$@\"\n")
    shim.chmod(0o755)
    names = []
    for path in unit_files():
        name = path.name.replace("@.", f"@{INSTANCE}.")
        (tmp_path / name).write_text(path.read_text().replace("/usr/local/bin/octofs", str(shim)))
        names.append(str(tmp_path / name))
    result = subprocess.run([analyze, "verify", "--man=no", *names], capture_output=True, text=True, timeout=120,
                            check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
