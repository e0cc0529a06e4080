"""The intent ring: what an unclean stop left unjournaled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from octofs.intent import SEQ_MARGIN, SLOTS, IntentRing

BOOT = b"b" * 16


def test_first_run_and_clean_stop_leave_nothing(tmp_path: Path):
    ring, paths = IntentRing.open(tmp_path / "intent", last_seq=0, boot_id=BOOT)
    assert paths == []
    ring.note(1, b"a")
    ring.close(clean=True)
    ring, paths = IntentRing.open(tmp_path / "intent", last_seq=0, boot_id=BOOT)
    assert paths == []
    ring.close(clean=True)


def test_paths_near_and_beyond_the_last_seq_survive_a_killed_process(tmp_path: Path):
    # A real process notes intents and is SIGKILLed: the page cache keeps what it wrote.
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from octofs.intent import IntentRing
ring, _ = IntentRing.open({str(tmp_path / 'intent')!r}, last_seq=0, boot_id={BOOT!r})
for seq in range(1, 1001):
    ring.note(seq, b"f%d" % seq, b"dst" if seq == 1000 else None)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    ring, paths = IntentRing.open(tmp_path / "intent", last_seq=998, boot_id=BOOT)
    ring.close(clean=False)
    expected = {b"f%d" % s for s in range(998 - SEQ_MARGIN + 1, 1001)} | {b"dst"}
    assert set(paths) == expected
    assert len(paths) < SLOTS


def test_other_boot_or_too_long_means_everything(tmp_path: Path):
    ring, _ = IntentRing.open(tmp_path / "intent", last_seq=0, boot_id=BOOT)
    ring.note(5, b"x")
    ring.close(clean=False)
    ring, paths = IntentRing.open(tmp_path / "intent", last_seq=0, boot_id=b"c" * 16)
    assert paths is None
    ring.note(7, b"y" * 9000)
    ring.close(clean=False)
    _, paths = IntentRing.open(tmp_path / "intent", last_seq=0, boot_id=b"c" * 16)
    assert paths is None


def test_a_damaged_ring_means_everything(tmp_path: Path):
    p = tmp_path / "intent"
    ring, _ = IntentRing.open(p, last_seq=0, boot_id=BOOT)
    ring.close(clean=False)
    with open(p, "r+b") as f:
        f.write(b"OCTOINTN" + (99).to_bytes(4, "little"))
    _, paths = IntentRing.open(p, last_seq=0, boot_id=BOOT)
    assert paths is None
    os.truncate(p, 100)
    _, paths = IntentRing.open(p, last_seq=0, boot_id=BOOT)
    assert paths is None


def test_slot_layout_of_one_two_and_no_paths(tmp_path: Path):
    # The layout of the module docstring, byte for byte: u64 seq, u16 len1, u16 len2, u32 0, the paths.
    p = tmp_path / "intent"
    ring, _ = IntentRing.open(p, last_seq=0, boot_id=BOOT)
    ring.note(3, b"a/b")
    ring.note(4, b"src", b"dst/x")
    ring.note(5, None, b"only")
    ring.note(6, None)
    ring.note(7, b"z" * 8180)  # one path too long for its slot
    ring.close(clean=False)
    raw = p.read_bytes()
    slot = [raw[64 + i * 8192:64 + (i + 1) * 8192] for i in range(5)]

    def le(n: int, size: int) -> bytes:
        return n.to_bytes(size, "little")

    assert slot[0][:19] == le(3, 8) + le(3, 2) + le(0, 2) + le(0, 4) + b"a/b"
    assert slot[1][:24] == le(4, 8) + le(3, 2) + le(5, 2) + le(0, 4) + b"srcdst/x"
    assert slot[2][:20] == le(5, 8) + le(4, 2) + le(0, 2) + le(0, 4) + b"only"
    assert slot[3][:16] == le(6, 8) + bytes(8)
    assert slot[4][:16] == le(7, 8) + le(0xFFFF, 2) + bytes(6)
    assert raw[40:48] == le(5, 8)  # the next slot counter, the header's last field
    _, paths = IntentRing.open(p, last_seq=0, boot_id=BOOT)
    assert paths is None  # the too-long path: compare everything
