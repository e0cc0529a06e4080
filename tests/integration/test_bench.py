"""scripts/bench (README "Benchmarks") must keep working: a quick run, one repetition, JSON out."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import REPO

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

FSYNCING = {"seq-write-1m-fsync", "rand-write-4k-fsync", "sqlite-wal-full", "sqlite-delete-extra",
            "pgbench"}  # also run with a sync target
WORKLOADS = {"seq-write-1m-fsync": "MiB/s", "rand-write-4k-fsync": "ops/s", "rand-write-4k-buffered": "ops/s",
             "seq-read-1m-hot": "MiB/s", "seq-read-1m-cold": "MiB/s", "small-files": "files/s",
             "sqlite-wal-full": "tx/s",
             "sqlite-delete-extra": "tx/s", "pgbench": "tps"}
# pgbench needs Debian's postgresql (scripts/setup installs it; CI has it) and root.
HAVE_POSTGRES = bool(glob.glob("/usr/lib/postgresql/*/bin/pgbench")) and os.geteuid() == 0
BENCH_HANG_S = 600  # see test_bench_quick_json


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A 0755 directory under /tmp: pgbench's server runs as the postgres user, which cannot enter
    pytest's 0700 tmp dirs."""
    d = Path(tempfile.mkdtemp(prefix="octofs-bench-test-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_bench_quick_json(public_tmp: Path) -> None:
    work = public_tmp / "bench"
    args = [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--reps", "1", "--json",
            "--workdir", str(work)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        # A guard against a hang, not a speed limit: the quick run takes about 40-80 s on 2 shared cores
        # (PostgreSQL's initdb on each side is most of it), and took over 300 s with the machine at load 8.
        out, err = proc.communicate(timeout=BENCH_HANG_S)
    except subprocess.TimeoutExpired:
        # SIGTERM, not subprocess.run's SIGKILL: bench.py then unmounts and stops what it started (a SIGKILL
        # left its three mounts and their daemons running for the rest of the suite).
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"scripts/bench --quick still running after {BENCH_HANG_S} s (ended, exit {proc.returncode}):\n"
                    f"{out}{err}")
    res = subprocess.CompletedProcess(args, proc.returncode, out, err)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)  # stdout is exactly one JSON document
    assert doc["reps"] == 1 and doc["quick"] is True
    if HAVE_POSTGRES:
        assert set(doc["workloads"]) == set(WORKLOADS) and "skipped" not in doc, doc.get("skipped")
    else:  # skipped with a note, never silently
        assert set(doc["workloads"]) == set(WORKLOADS) - {"pgbench"}
        assert "pgbench" in doc["skipped"] and "pgbench: skipped" in res.stderr
    for name, w in doc["workloads"].items():
        assert w["unit"] == WORKLOADS[name], name
        for key in ("native_median", "octofs_median", "ratio", "wait_synced_s_median"):
            assert w[key] > 0, (name, key, w)
        assert len(w["native_samples"]) == len(w["octofs_samples"]) == 1, name
        assert all(x > 0 for x in w["native_samples"] + w["octofs_samples"]), name
        assert w["wire_bytes_per_byte_written"] > 0, (name, w)
        # The reference (scripts/refpassthrough.py) ran interleaved with the others, every workload.
        assert len(w["passthrough_samples"]) == 1 and w["passthrough_samples"][0] > 0, (name, w)
        for key in ("passthrough_median", "passthrough_ratio", "octofs_pt_ratio"):
            assert w[key] > 0, (name, key, w)
        assert w["octofs_pt_ratio"] == pytest.approx(w["octofs_median"] / w["passthrough_median"]), (name, w)
        if name in FSYNCING:
            assert w["sync_median"] > 0 and w["sync_ratio"] > 0 and len(w["sync_samples"]) == 1, (name, w)
        else:
            assert w["sync_median"] is None and w["sync_samples"] == [], (name, w)
    assert "octofs vs native" in res.stderr  # the table still goes to stderr
    assert "passthrough" in res.stderr and "octofs/pt" in res.stderr  # the reference's columns
    lag = doc["lag"]  # every probe write reached the target, each lag measured
    assert lag["missing"] == 0 and lag["writes"] > 0, lag
    assert 0 <= lag["p50_ms"] <= lag["p99_ms"] <= lag["max_ms"], lag
    rss = doc["rss_behind"]  # the target really was behind, and the daemon's memory was sampled
    assert rss["behind_ops"] > 0 and rss["rss_peak_catch_up_mib"] >= rss["rss_before_mib"] > 0, rss
    assert isinstance(doc["fio"], bool)
    # Nothing left mounted or running.
    for side in ("async", "sync"):
        assert not os.path.ismount(work / side / "mnt"), side
        serve_pid = json.loads((work / side / "serve-ready.json").read_text())["pid"]
        assert not Path(f"/proc/{serve_pid}").exists(), f"octofs serve ({side}) still running"
    pt_pid = json.loads((work / "passthrough" / "ready.json").read_text())["pid"]
    assert not os.path.ismount(work / "passthrough" / "mnt")
    assert not Path(f"/proc/{pt_pid}").exists(), "refpassthrough still running"
    assert not any(str(work) in line for line in Path("/proc/mounts").read_text().splitlines())
