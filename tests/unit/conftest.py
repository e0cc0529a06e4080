"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from octofs.journal import JournalWriter
from octofs.recorder import Recorder


@pytest.fixture
def recorder(tmp_path):
    """A Recorder over a fresh journal in ``tmp_path / "j"``."""
    writer = JournalWriter.open(tmp_path / "j", vault_id=bytes(range(16)), epoch=1)
    yield Recorder(writer)
    writer.close()
