"""The CLI's contract for user mistakes: one line on stderr, a documented exit code, no traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from octofs.cli import main
from tests.support.daemons import run_octofs


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "backing").mkdir()
    (tmp_path / "mnt").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


GOOD = "vault: sales\nbacking: backing\nstate_dir: state\n"

# (name, vault.yaml text or None for a missing file, exit code, regex the message must match)
BAD_CASES = [
    ("missing file", None, 11, r"^Cannot read vault\.yaml: No such file or directory$"),
    ("bad yaml", "vault: sales\nbacking: [unclosed\n", 12, r"^vault\.yaml:\d+: not valid YAML: "),
    ("unknown key", GOOD + "bakcing: x\n", 13, r"^vault\.yaml:4: bakcing: unknown key"),
    ("wrong type", GOOD + "exclude: 5\n", 13, r"^vault\.yaml:4: exclude: "),
    ("backing missing", "vault: sales\nbacking: nowhere\n", 13, r"^vault\.yaml:2: backing: .*does not exist"),
    ("backing inside mountpoint", "vault: sales\nbacking: mnt/inner\nstate_dir: state\n", 13,
     r"^vault\.yaml:2: backing: .*mnt"),
    ("bad target address", GOOD + "targets:\n  - name: b1\n    address: 'foo:bar'\n", 13,
     r"^vault\.yaml:6: targets\[0\]\.address: .*'foo:bar'"),
]


@pytest.mark.parametrize("name,text,code,pattern", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_vault_yaml_one_line(ws: Path, capsys, name, text, code, pattern) -> None:
    if name == "backing inside mountpoint":
        (ws / "mnt" / "inner").mkdir()
    if text is not None:
        (ws / "vault.yaml").write_text(text)
    rc = main(["mount", "vault.yaml", "mnt"])
    out, err = capsys.readouterr()
    assert rc == code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("octofs: error: ")
    assert re.search(pattern, lines[0][len("octofs: error: "):]), lines[0]
    assert "Traceback" not in err and out == ""


def test_bad_vault_yaml_in_a_real_process(ws: Path) -> None:
    (ws / "vault.yaml").write_text(GOOD + "targets: {name: x}\n")
    res = run_octofs("mount", "vault.yaml", "mnt", cwd=ws)
    assert res.returncode == 13
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("octofs: error: vault.yaml:4: targets")
    assert "Traceback" not in res.stderr


def test_mountpoint_problems(ws: Path, capsys) -> None:
    (ws / "vault.yaml").write_text(GOOD)
    assert main(["mount", "vault.yaml", "nowhere"]) == 21
    assert "no such directory" in capsys.readouterr().err
    (ws / "mnt" / "x").write_text("")
    assert main(["mount", "vault.yaml", "mnt"]) == 21
    assert "not empty" in capsys.readouterr().err
    (ws / "file").write_text("")
    assert main(["mount", "vault.yaml", "file"]) == 21
    assert "not a directory" in capsys.readouterr().err


def test_umount_of_something_else(ws: Path, capsys) -> None:
    assert main(["umount", "mnt"]) == 24
    assert capsys.readouterr().err.strip() == f"octofs: error: {ws / 'mnt'} is not an octofs mount"


def test_usage_error_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["mount"])
    assert info.value.code == 2


def test_common_options_before_or_after_command(ws: Path, capsys) -> None:
    (ws / "vault.yaml").write_text("nope: 1\n")
    assert main(["-q", "mount", "vault.yaml", "mnt"]) == 13
    assert main(["mount", "-q", "vault.yaml", "mnt"]) == 13
