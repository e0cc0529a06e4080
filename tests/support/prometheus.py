"""A strict reader of the Prometheus text format (0.0.4), for tests of the metrics endpoint."""

from __future__ import annotations

import re

_SAMPLE = re.compile(r'^([a-z_]+)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """A strict reader of the text format: every line is HELP, TYPE or a sample."""
    assert text.endswith("\n")
    out: dict[tuple[str, frozenset], float] = {}
    typed = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter")
            assert name not in typed, f"{name} typed twice"
            typed.add(name)
            continue
        m = _SAMPLE.match(line)
        assert m, line
        name, labels = m.group(1), m.group(3) or ""
        assert name in typed, f"{name} has no TYPE before it"
        pairs = _LABEL.findall(labels)
        assert ",".join(f'{k}="{v}"' for k, v in pairs) == labels, line
        key = (name, frozenset((k, v.replace('\\"', '"').replace("\\\\", "\\")) for k, v in pairs))
        assert key not in out, f"duplicate sample {line}"
        out[key] = float(m.group(4))
    return out


def get(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]
