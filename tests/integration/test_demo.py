"""The README's first command must keep working: run the demo (small) and check what it reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemons import REPO

pytestmark = pytest.mark.fuse


def test_demo_runs_and_verifies(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--transactions", "60", "--workdir", str(work)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = " ".join(res.stdout.split())
    assert "identical" in out and "integrity_check=ok, 60 orders (expected 60)" in out
    assert "vaults received" in out and "shop" in out
    # Nothing left running or mounted.
    assert not os.path.ismount(work / "mnt")
