"""Test-suite plumbing: FUSE marker, stale-mount sweep, shared fixtures."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import settings

from tests.support.fuse import apply_fuse_marker, sweep_stale_mounts

# No per-example deadline for any property test (Hypothesis's default is 200 ms of wall time): on 2
# loaded cores examples of test_codec and test_codec_fastpath took 270-410 ms and failed as
# DeadlineExceeded/FlakyFailure, though nothing was wrong. A hang is still caught by faulthandler and
# the tests' own timeouts. A test's @settings(...) inherits this unless it names a deadline itself.
settings.register_profile("octofs", deadline=None)
settings.load_profile("octofs")


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
