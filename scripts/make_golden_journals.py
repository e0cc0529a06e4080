"""Regenerate the golden journal cases in tests/data/journal/<case>/.

Run deliberately, together with a JOURNAL_FORMAT_VERSION bump (docs/FORMAT.md §1): the golden files pin the
format, and tests/unit/test_journal.py fails if the code no longer writes exactly these bytes.

    PYTHONPATH=. python scripts/make_golden_journals.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.journal_helpers import GOLDEN_CASES, write_golden_cases  # noqa: E402


def main() -> int:
    out = REPO / "tests" / "data" / "journal"
    write_golden_cases(out)
    for case in GOLDEN_CASES:
        print(f"wrote {out / case}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
