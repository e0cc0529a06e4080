"""Starting octofs daemons as subprocesses for tests, with a teardown that always cleans up."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support.fuse import unmount, wait_for_ready

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
