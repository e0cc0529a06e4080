"""Tests for octofs/config.py: vault.yaml and SERVE.yaml parsing, defaults and error messages.

Each bad case pins the exact one-line message (file name as given, line number,
key path) and the exit code, because that line is the whole user interface of a
config mistake.
"""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from octofs.config import (
    JournalConfig,
    ServeConfig,
    TargetConfig,
    VaultConfig,
    format_duration,
    format_size,
    load_serve_config,
    load_vault_config,
    parse_duration,
    parse_size,
)
from octofs.errors import (
    ConfigError,
    ConfigFileError,
    ConfigSyntaxError,
    ConfigValueError,
    UsageError,
)


@pytest.fixture
def vault_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the current directory, holding a backing dir named data/."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


# -- bad vault.yaml: (id, file text, expected message, exit code, mountpoint) ----------
# "{tmp}" in a message stands for the (resolved) test directory. The file is always
# written to ./vault.yaml and loaded as "vault.yaml", so messages start with that.

MINIMAL = "vault: sales\nbacking: data\n"

BAD_VAULTS = [
    # YAML syntax
    ("unclosed-flow", "vault: sales\nbacking: [data\n", "vault.yaml:3: not valid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence on line 2)", 12, None),
    ("tab-indent", "vault: sales\n\tbacking: data\n", "vault.yaml:2: not valid YAML: found a tab character; YAML indents with spaces only", 12, None),
    ("unclosed-quote", 'vault: "sales\nbacking: data\n', "vault.yaml:3: not valid YAML: found unexpected end of stream (while scanning a quoted scalar on line 1)", 12, None),
    ("two-documents", "vault: a\n---\nvault: b\n", "vault.yaml:2: not valid YAML: expected a single document in the stream, but found another document", 12, None),
    ("deep-nesting", "vault: " + "[" * 5000 + "]" * 5000 + "\n", "vault.yaml:1: not valid YAML: nested too deeply", 12, None),
    ("control-char", "vault: sales\nbacking: da\x07ta\n", "vault.yaml:2: not valid YAML: special characters are not allowed (U+0007)", 12, None),
    # shape of the document
    ("empty", "", "vault.yaml:1: top level: expected a mapping of keys such as vault: and backing:, got nothing", 13, None),
    ("top-list", "- vault: sales\n", "vault.yaml:1: top level: expected a mapping of keys such as vault: and backing:, got a list", 13, None),
    ("top-scalar", "sales\n", "vault.yaml:1: top level: expected a mapping of keys such as vault: and backing:, got 'sales'", 13, None),
    ("unknown-key-suggest", MINIMAL + "exclud: []\n", "vault.yaml:3: exclud: unknown key; did you mean 'exclude'?", 13, None),
    ("unknown-key-list", MINIMAL + "colour: red\n", "vault.yaml:3: colour: unknown key; allowed keys: vault, backing, state_dir, exclude, forwarding, secret_file, journal, targets, failover, allow_other, metrics", 13, None),
    ("duplicate-key", MINIMAL + "vault: other\n", "vault.yaml:3: vault: duplicate key (first given on line 1)", 13, None),
    ("non-string-key", MINIMAL + "1: x\n", "vault.yaml:3: top level: keys must be names, got integer 1", 13, None),
    ("bool-key", MINIMAL + "on: x\n", "vault.yaml:3: top level: keys must be names, got boolean true", 13, None),
    ("python-tag", "vault: !!python/object:os.system x\nbacking: data\n", "vault.yaml:1: vault: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object:os.system'", 13, None),
    # vault
    ("vault-missing", "backing: data\n", "vault.yaml:1: vault: required key is missing", 13, None),
    ("vault-null", "vault:\nbacking: data\n", "vault.yaml:1: vault: required key has no value", 13, None),
    ("vault-yes", "vault: yes\nbacking: data\n", "vault.yaml:1: vault: expected a string, got boolean true (YAML reads yes/no/on/off as booleans; quote the value)", 13, None),
    ("vault-int", "vault: 2024\nbacking: data\n", "vault.yaml:1: vault: expected a string, got integer 2024 (quote the value)", 13, None),
    ("vault-list", "vault: [a]\nbacking: data\n", "vault.yaml:1: vault: expected a string, got a list", 13, None),
    ("vault-slash", "vault: a/b\nbacking: data\n", "vault.yaml:1: vault: expected 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit, got 'a/b'", 13, None),
    ("vault-dotdot", "vault: ..\nbacking: data\n", "vault.yaml:1: vault: expected 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit, got '..'", 13, None),
    ("vault-too-long", f"vault: {'a' * 65}\nbacking: data\n", f"vault.yaml:1: vault: expected 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit, got '{'a' * 65}'", 13, None),
    # backing and state_dir
    ("backing-missing", "vault: sales\n", "vault.yaml:1: backing: required key is missing", 13, None),
    ("backing-absent-dir", "vault: sales\nbacking: /nonexistent/octofs/x\n", "vault.yaml:2: backing: directory /nonexistent/octofs/x does not exist", 13, None),
    ("backing-relative-absent", "vault: sales\nbacking: nope\n", "vault.yaml:2: backing: directory {tmp}/nope does not exist", 13, None),
    ("backing-is-file", "vault: sales\nbacking: vault.yaml\n", "vault.yaml:2: backing: {tmp}/vault.yaml is not a directory", 13, None),
    ("backing-int", "vault: sales\nbacking: 5\n", "vault.yaml:2: backing: expected a string, got integer 5 (quote the value)", 13, None),
    ("state-in-backing", MINIMAL + "state_dir: data/.state\n", "vault.yaml:3: state_dir: {tmp}/data/.state is inside the backing directory {tmp}/data", 13, None),
    ("state-is-backing", MINIMAL + "state_dir: data\n", "vault.yaml:3: state_dir: {tmp}/data is also the backing directory", 13, None),
    ("backing-in-state", "vault: sales\nbacking: data\nstate_dir: .\n", "vault.yaml:3: state_dir: the backing directory {tmp}/data is inside the state_dir {tmp}", 13, None),
    # mountpoint overlaps (the mountpoint is given relative to the current directory)
    ("mnt-in-backing", MINIMAL, "vault.yaml:2: backing: the mountpoint {tmp}/data/mnt is inside the backing directory {tmp}/data", 13, "data/mnt"),
    ("mnt-is-backing", MINIMAL, "vault.yaml:2: backing: {tmp}/data is also the mountpoint", 13, "data"),
    ("backing-in-mnt", MINIMAL, "vault.yaml:2: backing: {tmp}/data is inside the mountpoint {tmp}", 13, "."),
    ("backing-in-mnt-via-symlink", MINIMAL, "vault.yaml:2: backing: {tmp}/data is inside the mountpoint {tmp}", 13, "link-to-tmp"),
    ("state-in-mnt", MINIMAL + "state_dir: mnt/state\n", "vault.yaml:3: state_dir: {tmp}/mnt/state is inside the mountpoint {tmp}/mnt", 13, "mnt"),
    ("default-state-is-mnt", MINIMAL, "vault.yaml:2: backing: the default state_dir {tmp}/data.octofs is also the mountpoint", 13, "data.octofs"),
    ("mnt-in-state", MINIMAL + "state_dir: st\n", "vault.yaml:3: state_dir: the mountpoint {tmp}/st/mnt is inside the state_dir {tmp}/st", 13, "st/mnt"),
    # secret_file
    ("secret-missing", MINIMAL + "secret_file: secret\n", "vault.yaml:3: secret_file: file {tmp}/secret does not exist", 13, None),
    ("secret-is-dir", MINIMAL + "secret_file: data\n", "vault.yaml:3: secret_file: {tmp}/data is a directory, expected a file", 13, None),
    # exclude, forwarding, allow_other
    ("exclude-string", MINIMAL + "exclude: '*.tmp'\n", "vault.yaml:3: exclude: expected a list of strings, got '*.tmp'", 13, None),
    ("exclude-item", MINIMAL + "exclude:\n  - '*.tmp'\n  - 3\n", "vault.yaml:5: exclude[1]: expected a non-empty string, got integer 3", 13, None),
    ("exclude-empty-item", MINIMAL + "exclude: ['']\n", "vault.yaml:3: exclude[0]: expected a non-empty string, got ''", 13, None),
    ("forwarding-maybe", MINIMAL + "forwarding: maybe\n", "vault.yaml:3: forwarding: expected on/off or true/false, got 'maybe'", 13, None),
    ("forwarding-int", MINIMAL + "forwarding: 1\n", "vault.yaml:3: forwarding: expected on/off or true/false, got integer 1", 13, None),
    ("allow-other-list", MINIMAL + "allow_other: [yes]\n", "vault.yaml:3: allow_other: expected on/off or true/false, got a list", 13, None),
    # journal and failover
    ("journal-scalar", MINIMAL + "journal: 8GiB\n", "vault.yaml:3: journal: expected a mapping with max_size and when_full, got '8GiB'", 13, None),
    ("journal-unknown", MINIMAL + "journal:\n  max_sise: 1GiB\n", "vault.yaml:4: journal.max_sise: unknown key; did you mean 'max_size'?", 13, None),
    ("journal-bad-size", MINIMAL + "journal: {max_size: 8 gigs}\n", "vault.yaml:3: journal.max_size: expected a size such as 8GiB, 500MB or 1048576, got '8 gigs'", 13, None),
    ("journal-fraction", MINIMAL + "journal: {max_size: 0.5B}\n", "vault.yaml:3: journal.max_size: expected a size such as 8GiB, 500MB or 1048576, got '0.5B' (not a whole number of bytes)", 13, None),
    ("journal-negative", MINIMAL + "journal: {max_size: -1}\n", "vault.yaml:3: journal.max_size: expected a size such as 8GiB, 500MB or 1048576, got -1 (negative)", 13, None),
    ("journal-zero", MINIMAL + "journal: {max_size: 0}\n", "vault.yaml:3: journal.max_size: must be larger than zero", 13, None),
    ("journal-when-full", MINIMAL + "journal:\n  when_full: drop\n", "vault.yaml:4: journal.when_full: expected one of block, resync, got 'drop'", 13, None),
    ("heartbeat-bad", MINIMAL + "failover: {heartbeat: soon}\n", "vault.yaml:3: failover.heartbeat: expected a duration such as 5s, 250ms, 2m or 1h30m, got 'soon'", 13, None),
    ("heartbeat-zero", MINIMAL + "failover: {heartbeat: 0s}\n", "vault.yaml:3: failover.heartbeat: must be longer than zero, got '0s'", 13, None),
    ("heartbeat-inf", MINIMAL + "failover: {heartbeat: .inf}\n", "vault.yaml:3: failover.heartbeat: expected a duration such as 5s, 250ms, 2m or 1h30m, got number inf", 13, None),
    # targets
    ("targets-mapping", MINIMAL + "targets:\n  backup1: {address: b:1}\n", "vault.yaml:4: targets: expected a list of targets, got a mapping", 13, None),
    ("target-scalar", MINIMAL + "targets:\n  - backup1.lan:7070\n", "vault.yaml:4: targets[0]: expected a mapping with name and address, got 'backup1.lan:7070'", 13, None),
    ("target-unknown-key", MINIMAL + "targets:\n  - name: b1\n    adress: b:1\n", "vault.yaml:5: targets[0].adress: unknown key; did you mean 'address'?", 13, None),
    ("target-no-name", MINIMAL + "targets:\n  - address: b:1\n", "vault.yaml:4: targets[0].name: required key is missing", 13, None),
    ("target-no-address", MINIMAL + "targets:\n  - name: b1\n  - name: b2\n    mode: sync\n", "vault.yaml:4: targets[0].address: required key is missing", 13, None),
    ("target-bad-name", MINIMAL + "targets:\n  - {name: 'backup 1', address: b}\n", "vault.yaml:4: targets[0].name: expected 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit, got 'backup 1'", 13, None),
    ("target-dup-name", MINIMAL + "targets:\n  - name: b1\n    address: x:1\n  - name: b1\n    address: y:1\n", "vault.yaml:6: targets[1].name: duplicate target name 'b1' (also targets[0], line 4)", 13, None),
    ("address-port-word", MINIMAL + "targets:\n  - name: b1\n    mode: sync\n    address: foo:bar\n", "vault.yaml:6: targets[0].address: expected HOST:PORT, got 'foo:bar'", 13, None),
    ("address-port-zero", MINIMAL + "targets:\n  - {name: b1, address: 'foo:0'}\n", "vault.yaml:4: targets[0].address: expected HOST:PORT with a port from 1 to 65535, got 'foo:0'", 13, None),
    ("address-port-big", MINIMAL + "targets:\n  - {name: b1, address: 'foo:65536'}\n", "vault.yaml:4: targets[0].address: expected HOST:PORT with a port from 1 to 65535, got 'foo:65536'", 13, None),
    ("address-no-host", MINIMAL + "targets:\n  - {name: b1, address: ':7070'}\n", "vault.yaml:4: targets[0].address: expected HOST:PORT, got ':7070' (no host)", 13, None),
    ("address-bare-ipv6", MINIMAL + "targets:\n  - {name: b1, address: '::1:7070'}\n", "vault.yaml:4: targets[0].address: expected HOST:PORT, got '::1:7070' (write an IPv6 address in brackets, as in [::1]:7070)", 13, None),
    ("address-bad-ipv6", MINIMAL + "targets:\n  - {name: b1, address: '[zz]:7070'}\n", "vault.yaml:4: targets[0].address: expected HOST:PORT, got '[zz]:7070' ('zz' is not an IPv6 address)", 13, None),
    ("address-unclosed-bracket", MINIMAL + "targets:\n  - {name: b1, address: '[::1:7070'}\n", "vault.yaml:4: targets[0].address: expected HOST:PORT, got '[::1:7070'", 13, None),
    ("address-bad-host", MINIMAL + "targets:\n  - {name: b1, address: 'a b:1'}\n", "vault.yaml:4: targets[0].address: expected HOST:PORT, got 'a b:1' ('a b' is not a host name or address)", 13, None),
    ("address-sexagesimal", MINIMAL + "targets:\n  - {name: b1, address: 1:30}\n", "vault.yaml:4: targets[0].address: expected a string, got integer 90 (quote the value)", 13, None),
    ("target-mode", MINIMAL + "targets:\n  - {name: b1, address: b, mode: asnyc}\n", "vault.yaml:4: targets[0].mode: expected one of async, sync, got 'asnyc'", 13, None),
    ("target-compress-off", MINIMAL + "targets:\n  - {name: b1, address: b, compress: off}\n", "vault.yaml:4: targets[0].compress: expected one of none, auto, zstd, got boolean false", 13, None),
    ("target-on-timeout", MINIMAL + "targets:\n  - {name: b1, address: b, on_timeout: wait}\n", "vault.yaml:4: targets[0].on_timeout: expected one of degrade, block, got 'wait'", 13, None),
    ("target-sync-timeout", MINIMAL + "targets:\n  - {name: b1, address: b, sync_timeout: 5 sec}\n", "vault.yaml:4: targets[0].sync_timeout: expected a duration such as 5s, 250ms, 2m or 1h30m, got '5 sec'", 13, None),
    ("target-bandwidth", MINIMAL + "targets:\n  - {name: b1, address: b, bandwidth: fast}\n", "vault.yaml:4: targets[0].bandwidth: expected bytes per second such as 8GiB, 500MB or 1048576, got 'fast'", 13, None),
    ("target-nested-deep-line", MINIMAL + "targets:\n  - name: b1\n    address: b\n  - name: b2\n    address: c\n    compress:\n      - zstd\n", "vault.yaml:9: targets[1].compress: expected one of none, auto, zstd, got a list", 13, None),
    ("target-merge-scalar", MINIMAL + "targets:\n  - {<<: 5, name: b1}\n", "vault.yaml:4: targets[0]: expected a mapping or list of mappings for merging, but found scalar", 13, None),
]


@pytest.mark.parametrize(
    ("text", "message", "exit_code", "mountpoint"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_VAULTS],
)
def test_bad_vault_yaml(vault_dir: Path, text: str, message: str, exit_code: int, mountpoint: str | None) -> None:
    (vault_dir / "vault.yaml").write_text(text, encoding="utf-8")
    (vault_dir / "mnt").mkdir()
    (vault_dir / "link-to-tmp").symlink_to(vault_dir)
    with pytest.raises(ConfigError) as info:
        load_vault_config("vault.yaml", mountpoint=None if mountpoint is None else Path(mountpoint))
    assert str(info.value) == message.format(tmp=os.path.realpath(vault_dir))
    assert info.value.exit_code == exit_code
    assert "\n" not in str(info.value)


def test_missing_file_names_the_path_as_given(vault_dir: Path) -> None:
    with pytest.raises(ConfigFileError) as info:
        load_vault_config("conf/../missing.yaml")
    assert str(info.value) == "Cannot read conf/../missing.yaml: No such file or directory"
    assert info.value.exit_code == 11


def test_directory_as_file(vault_dir: Path) -> None:
    with pytest.raises(ConfigFileError) as info:
        load_vault_config(Path("data"))
    assert str(info.value) == "Cannot read data: Is a directory"


def test_not_utf8(vault_dir: Path) -> None:
    (vault_dir / "vault.yaml").write_bytes(b"vault: sales\nbacking: d\xffata\n")
    with pytest.raises(ConfigSyntaxError) as info:
        load_vault_config("vault.yaml")
    assert str(info.value) == "vault.yaml:2: not valid YAML: not UTF-8 text (byte 0xff)"
    assert info.value.exit_code == 12


def test_unreadable_file(vault_dir: Path) -> None:
    # A directory where the file should be is unreadable for root too (EISDIR),
    # so this error path runs whoever runs the suite.
    (vault_dir / "vault.yaml").mkdir()
    with pytest.raises(ConfigFileError) as info:
        load_vault_config("vault.yaml")
    assert str(info.value).startswith("Cannot read vault.yaml: ")
    assert info.value.exit_code == 11


def test_message_uses_absolute_file_name_when_given(vault_dir: Path) -> None:
    path = write(vault_dir / "v.yaml", "vault: sales\n")
    with pytest.raises(ConfigValueError) as info:
        load_vault_config(path)
    assert str(info.value) == f"{path}:1: backing: required key is missing"
    assert info.value.fields["line"] == 1
    assert info.value.fields["key"] == "backing"


# -- good vault.yaml ----------------------------------------------------------------


def test_minimal_vault_gets_every_default(vault_dir: Path) -> None:
    write(vault_dir / "vault.yaml", MINIMAL)
    cfg = load_vault_config("vault.yaml")
    real = Path(os.path.realpath(vault_dir))
    assert cfg == VaultConfig(
        path=vault_dir / "vault.yaml",
        vault="sales",
        backing=real / "data",
        state_dir=real / "data.octofs",
        exclude=(),
        forwarding=True,
        secret_file=None,
        journal=JournalConfig(max_size_bytes=8 * 2**30, when_full="block"),
        targets=(),
        heartbeat_s=15.0,
        allow_other=False,
    )
    assert cfg.path.is_absolute()


def test_design_example(vault_dir: Path) -> None:
    (vault_dir / "secret").write_text("s3cret\n")
    write(
        vault_dir / "vault.yaml",
        f"""
        vault: sales                       # letters, digits, '-', '_', '.'
        backing: {vault_dir}/data
        state_dir: {vault_dir}/state
        exclude: ["*.tmp", "pg_stat_tmp/**"]
        forwarding: off
        secret_file: {vault_dir}/secret
        journal: {{max_size: 1GiB, when_full: resync}}
        targets:
          - name: backup1
            address: backup1.lan:7070
            mode: sync
            sync_timeout: 250ms
            on_timeout: block
            compress: zstd
            bandwidth: 10MiB/s
          - name: dr.site_2
            address: "[2001:db8::7]:7171"
          - name: v4
            address: 10.0.0.9
        failover: {{heartbeat: 1m30s}}
        allow_other: yes
        """,
    )
    cfg = load_vault_config(vault_dir / "vault.yaml", mountpoint=vault_dir / "mnt")
    assert cfg.vault == "sales"
    assert cfg.state_dir == Path(os.path.realpath(vault_dir)) / "state"
    assert cfg.exclude == ("*.tmp", "pg_stat_tmp/**")
    assert cfg.forwarding is False
    assert cfg.secret_file == vault_dir / "secret"
    assert cfg.journal == JournalConfig(max_size_bytes=2**30, when_full="resync")
    assert cfg.heartbeat_s == 90.0
    assert cfg.allow_other is True
    assert cfg.targets == (
        TargetConfig("backup1", "backup1.lan", 7070, "sync", 0.25, "block", "zstd", 10 * 2**20),
        TargetConfig("dr.site_2", "2001:db8::7", 7171, "async", 5.0, "degrade", "auto", 0),
        TargetConfig("v4", "10.0.0.9", 7070, "async", 5.0, "degrade", "auto", 0),
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("on", True), ("off", False), ("yes", True), ("no", False), ("true", True), ("false", False),
     ("'on'", True), ("'off'", False), ('"OFF"', False), ("", True)],
)
def test_forwarding_spellings(vault_dir: Path, value: str, expected: bool) -> None:
    write(vault_dir / "vault.yaml", MINIMAL + f"forwarding: {value}\n")
    assert load_vault_config("vault.yaml").forwarding is expected


def test_relative_paths_are_relative_to_the_file_not_the_cwd(vault_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = vault_dir / "conf"
    (conf / "backing").mkdir(parents=True)
    (conf / "key").write_text("k")
    write(conf / "vault.yaml", "vault: v\nbacking: backing\nstate_dir: ../st\nsecret_file: key\n")
    monkeypatch.chdir(vault_dir / "data")
    cfg = load_vault_config("../conf/vault.yaml")
    real = Path(os.path.realpath(vault_dir))
    assert cfg.backing == real / "conf" / "backing"
    assert cfg.state_dir == real / "st"
    # not resolved (a symlinked secret may be swapped to rotate it), but absolute and the same file
    assert cfg.secret_file is not None and cfg.secret_file.is_absolute()
    assert cfg.secret_file.samefile(vault_dir / "conf" / "key")
    assert cfg.path == vault_dir / "data" / ".." / "conf" / "vault.yaml"


def test_backing_symlink_is_resolved_and_state_dir_sits_beside_the_target(vault_dir: Path) -> None:
    (vault_dir / "alias").symlink_to(vault_dir / "data")
    write(vault_dir / "vault.yaml", "vault: v\nbacking: alias\n")
    cfg = load_vault_config("vault.yaml")
    real = Path(os.path.realpath(vault_dir))
    assert cfg.backing == real / "data"
    assert cfg.state_dir == real / "data.octofs"


def test_home_is_expanded(vault_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(vault_dir))
    write(vault_dir / "vault.yaml", "vault: v\nbacking: ~/data\n")
    assert load_vault_config("vault.yaml").backing == Path(os.path.realpath(vault_dir)) / "data"


def test_null_optionals_mean_defaults(vault_dir: Path) -> None:
    write(vault_dir / "vault.yaml", MINIMAL + "state_dir:\nexclude: ~\ntargets:\njournal:\nfailover: {heartbeat: null}\n")
    cfg = load_vault_config("vault.yaml")
    assert cfg.state_dir.name == "data.octofs"
    assert (cfg.exclude, cfg.targets, cfg.heartbeat_s) == ((), (), 15.0)
    assert cfg.journal.max_size_bytes == 8 * 2**30


def test_anchors_and_merge_keys(vault_dir: Path) -> None:
    write(
        vault_dir / "vault.yaml",
        MINIMAL
        + """\
targets:
  - &wan {name: far, address: far.example:7070, compress: zstd, bandwidth: 1MB}
  - <<: *wan
    name: farther
    address: farther.example
""",
    )
    far, farther = load_vault_config("vault.yaml").targets
    assert (far.compress, far.bandwidth_bps) == ("zstd", 1_000_000)
    assert (farther.name, farther.host, farther.port, farther.compress) == ("farther", "farther.example", 7070, "zstd")


def test_config_is_frozen(vault_dir: Path) -> None:
    write(vault_dir / "vault.yaml", MINIMAL)
    cfg = load_vault_config("vault.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vault = "other"  # type: ignore[misc]


def test_mountpoint_beside_backing_is_fine(vault_dir: Path) -> None:
    write(vault_dir / "vault.yaml", MINIMAL)
    assert load_vault_config("vault.yaml", mountpoint=vault_dir / "mnt").vault == "sales"


# -- SERVE.yaml -----------------------------------------------------------------------


def test_serve_from_flags_only(vault_dir: Path) -> None:
    cfg = load_serve_config(None, root="data")
    assert cfg == ServeConfig(
        root=Path(os.path.realpath(vault_dir)) / "data",
        listen_host="0.0.0.0",
        listen_port=7070,
        secret_file=None,
        discovery=True,
        takeover_hooks=(),
        path=None,
    )


def test_serve_file_and_flag_override(vault_dir: Path) -> None:
    (vault_dir / "other").mkdir()
    (vault_dir / "secret").write_text("s")
    write(
        vault_dir / "serve.yaml",
        """
        root: data
        listen: "[::]:7171"
        secret_file: secret
        discovery: off
        takeover_hooks:
          - ip addr add 10.0.0.5/24 dev eth0
          - systemctl start postgresql
        """,
    )
    cfg = load_serve_config("serve.yaml")
    assert (cfg.root.name, cfg.listen_host, cfg.listen_port) == ("data", "::", 7171)
    assert cfg.secret_file == vault_dir / "secret"
    assert cfg.discovery is False
    assert cfg.takeover_hooks == ("ip addr add 10.0.0.5/24 dev eth0", "systemctl start postgresql")
    assert cfg.path == vault_dir / "serve.yaml"
    cfg = load_serve_config("serve.yaml", root="other", listen="127.0.0.1:0")
    assert (cfg.root.name, cfg.listen_host, cfg.listen_port) == ("other", "127.0.0.1", 0)
    cfg = load_serve_config(Path("serve.yaml"), listen=":9000")
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 9000)


BAD_SERVES = [
    ("no-root", None, {}, UsageError, "no root directory for received vaults: give --root DIR or set root in SERVE.yaml"),
    ("flag-root-missing", None, {"root": "nope"}, UsageError, "--root: directory {tmp}/nope does not exist"),
    ("flag-listen", None, {"root": "data", "listen": "x:y"}, UsageError, "--listen: expected HOST:PORT, got 'x:y'"),
    ("flag-secret", None, {"root": "data", "secret_file": "nope"}, UsageError, "--secret-file: file {tmp}/nope does not exist"),
    ("file-no-root", "listen: ':1'\n", {}, UsageError, "no root directory for received vaults: give --root DIR or set root in SERVE.yaml"),
    ("file-root-missing", "listen: ':1'\nroot: nope\n", {}, ConfigValueError, "serve.yaml:2: root: directory {tmp}/nope does not exist"),
    ("file-unknown", "root: data\nlisten_on: ':1'\n", {}, ConfigValueError, "serve.yaml:2: listen_on: unknown key; did you mean 'listen'?"),
    ("file-listen", "root: data\nlisten: 'h:99999'\n", {}, ConfigValueError, "serve.yaml:2: listen: expected HOST:PORT with a port from 0 to 65535, got 'h:99999'"),
    ("file-hooks", "root: data\ntakeover_hooks: start.sh\n", {}, ConfigValueError, "serve.yaml:2: takeover_hooks: expected a list of strings, got 'start.sh'"),
    ("file-discovery", "root: data\ndiscovery: sometimes\n", {}, ConfigValueError, "serve.yaml:2: discovery: expected on/off or true/false, got 'sometimes'"),
    ("file-syntax", "root: [data\n", {}, ConfigSyntaxError, "serve.yaml:2: not valid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence on line 1)"),
]


@pytest.mark.parametrize(("text", "flags", "error", "message"), [pytest.param(*c[1:], id=c[0]) for c in BAD_SERVES])
def test_bad_serve_config(vault_dir: Path, text: str | None, flags: dict, error: type, message: str) -> None:
    if text is not None:
        (vault_dir / "serve.yaml").write_text(text)
    with pytest.raises(error) as info:
        load_serve_config(None if text is None else "serve.yaml", **flags)
    assert str(info.value) == message.format(tmp=os.path.realpath(vault_dir))
    assert info.value.exit_code == error.exit_code


def test_serve_flag_wins_over_a_bad_file_value(vault_dir: Path) -> None:
    """A flag replaces the key, so the file's value is never judged."""
    write(vault_dir / "serve.yaml", "root: nope\nlisten: bad:port\n")
    cfg = load_serve_config("serve.yaml", root="data", listen="[::1]")
    assert (cfg.listen_host, cfg.listen_port) == ("::1", 7070)


# -- sizes and durations ----------------------------------------------------------------

SIZE_UNITS = {
    "": 1, "B": 1, "k": 1000, "K": 1000, "KB": 1000, "kB": 1000, "M": 10**6, "MB": 10**6, "G": 10**9,
    "GB": 10**9, "T": 10**12, "TB": 10**12, "Ki": 1024, "KiB": 1024, "kib": 1024, "MiB": 2**20,
    "Mi": 2**20, "GiB": 2**30, "GIB": 2**30, "TiB": 2**40,
}


@given(st.integers(min_value=0, max_value=10**15), st.sampled_from(sorted(SIZE_UNITS)), st.sampled_from(["", " "]))
def test_parse_size_units(n: int, unit: str, space: str) -> None:
    assert parse_size(f"{n}{space}{unit}") == n * SIZE_UNITS[unit]


@given(st.integers(min_value=0, max_value=2**64))
def test_size_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n
    assert parse_size(n) == n


@given(st.text(max_size=20))
def test_parse_size_never_raises_anything_but_valueerror(text: str) -> None:
    try:
        result = parse_size(text)
    except ValueError as exc:
        assert repr(text) in str(exc)
    else:
        assert isinstance(result, int) and result >= 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GiB", 8 * 2**30), ("500k", 500_000), ("1.5KiB", 1536), (" 2 MB ", 2_000_000), ("0", 0), (".5k", 500), (1024, 1024)],
)
def test_parse_size_examples(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "1e9", "1,000", "-5", "5 XB", "1.5", True, 1.5, None, "٣"])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


DURATION_UNITS = {"ms": Fraction(1, 1000), "s": 1, "m": 60, "h": 3600, "MS": Fraction(1, 1000), "S": 1, "H": 3600}


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(sorted(DURATION_UNITS)))
def test_parse_duration_units(n: int, unit: str) -> None:
    assert parse_duration(f"{n}{unit}") == float(n * DURATION_UNITS[unit])


@given(*(st.integers(min_value=0, max_value=999) for _ in range(4)))
def test_parse_duration_compound(h: int, m: int, s: int, ms: int) -> None:
    assert parse_duration(f"{h}h{m}m{s}s{ms}ms") == float(h * 3600 + m * 60 + s + Fraction(ms, 1000))


@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds
    assert parse_duration(seconds) == seconds


@given(st.text(max_size=20))
def test_parse_duration_never_raises_anything_but_valueerror(text: str) -> None:
    try:
        result = parse_duration(text)
    except ValueError as exc:
        assert repr(text) in str(exc)
    else:
        assert result >= 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5s", 5.0), ("250ms", 0.25), ("2m", 120.0), ("1h", 3600.0), ("1.5", 1.5), (3, 3.0), (0.5, 0.5), ("1h30m", 5400.0)],
)
def test_parse_duration_examples(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "s", "5 s", "5d", "-1s", "1e3s", "1m1", True, -2, float("nan"), float("inf"), 10**400, None])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [(3600, "1h"), (120, "2m"), (90, "90s"), (0, "0s"), (0.25, "0.25s"), (1e-5, "0.00001s")])
def test_format_duration_examples(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# -- docs/VAULT_YAML.md stays true ---------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "VAULT_YAML.md"


def _yaml_blocks() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    return [block.split("```", 1)[0] for block in text.split("```yaml\n")[1:]]


def test_documented_examples_load(vault_dir: Path) -> None:
    vault_example, serve_example = _yaml_blocks()
    (vault_dir / "secret").write_text("s")
    (vault_dir / "replicas").mkdir()
    for old, new in [
        ("/srv/octofs/sales", str(vault_dir / "data")),
        ("/var/lib/octofs/sales", str(vault_dir / "state")),
        ("/etc/octofs/secret", str(vault_dir / "secret")),
        ("/srv/octofs-replicas", str(vault_dir / "replicas")),
    ]:
        vault_example = vault_example.replace(old, new)
        serve_example = serve_example.replace(old, new)
    write(vault_dir / "vault.yaml", vault_example)
    cfg = load_vault_config("vault.yaml", mountpoint=vault_dir / "mnt")
    assert [t.name for t in cfg.targets] == ["backup1", "offsite"]
    assert cfg.targets[1].bandwidth_bps == 10 * 2**20
    write(vault_dir / "serve.yaml", serve_example)
    serve = load_serve_config("serve.yaml")
    assert len(serve.takeover_hooks) == 2


def test_documented_keys_match_the_code() -> None:
    from octofs import config

    text = DOC.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", text, flags=re.MULTILINE))
    expected = (
        {k for k in config._VAULT_KEYS if k not in ("journal", "failover")}
        | {f"journal.{k}" for k in config._JOURNAL_KEYS}
        | {f"failover.{k}" for k in config._FAILOVER_KEYS}
        | set(config._TARGET_KEYS)
        | set(config._SERVE_KEYS)
        | set(config._SERVE_FAILOVER_KEYS)
    )
    assert documented == expected


def test_file_under_a_non_directory(vault_dir: Path) -> None:
    write(vault_dir / "vault.yaml", MINIMAL)
    with pytest.raises(ConfigFileError) as info:
        load_vault_config("vault.yaml/inner.yaml")
    assert str(info.value) == "Cannot read vault.yaml/inner.yaml: Not a directory"
    assert info.value.exit_code == 11
