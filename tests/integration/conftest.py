"""Fixtures shared by the replication tests: a shared secret and one `octofs serve` target."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import Serve, free_port, serving


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A fresh shared secret file (mode 0600)."""
    path = tmp_path / "secret"
    path.write_text(os.urandom(16).hex() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def target(tmp_path: Path, secret: Path) -> Iterator[Serve]:
    """One `octofs serve` on a port chosen up front, so that it can be restarted on the same address."""
    with serving(tmp_path / "target", secret, workdir=tmp_path, port=free_port()) as s:
        yield s
