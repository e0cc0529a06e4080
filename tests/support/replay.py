"""Replaying a vault's journal into an empty directory with apply.py: the test of exact capture."""

from __future__ import annotations

import os
from pathlib import Path

from octofs.apply import apply_op
from octofs.journal import JournalReader


def replay_journal(journal_dir: Path, dest: Path, *, upto_seq: int | None = None) -> list[int]:
    """Apply every journaled op (up to ``upto_seq``) to ``dest``; return the seqs applied, in order."""
    dest.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    seqs = []
    try:
        for rec in JournalReader(journal_dir).records():
            if upto_seq is not None and rec.seq > upto_seq:
                break
            apply_op(fd, rec.op)
            seqs.append(rec.seq)
    finally:
        os.close(fd)
    return seqs
