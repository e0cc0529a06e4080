"""Test-suite plumbing: FUSE marker, stale-mount sweep, shared fixtures."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.support.fuse import apply_fuse_marker, sweep_stale_mounts


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("fuse") is not None:
            apply_fuse_marker(item)


@pytest.fixture(scope="session", autouse=True)
def _sweep_mounts(tmp_path_factory):
    base = Path(tmp_path_factory.getbasetemp())
    # Sweep the parent: earlier runs' numbered temp dirs live beside this one.
    sweep_stale_mounts(base.parent)
    yield
    left = sweep_stale_mounts(base, live_too=True)
    if left:
        raise AssertionError(f"tests left mounts behind (swept now): {left}")


@pytest.fixture(autouse=True)
def _restore_logging():
    """In-process `octofs.cli.main()` configures the root logger; undo it after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    octofs_levels = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)
                     if name.startswith("octofs")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in octofs_levels.items():
        logging.getLogger(name).setLevel(lvl)
