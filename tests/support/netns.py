"""A LAN of network namespaces for tests: one bridge, one veth per host, addresses in 10.213.X.0/24.

``lan(hosts)`` creates ``octo-t-<random>-br`` holding a bridge and one namespace per
host, each with ``eth0`` (a veth whose peer is on the bridge) and ``lo`` up. Every
namespace and link is created by the test and deleted in the teardown, whatever
happened; no address outside the namespaces is touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def netns_available() -> str | None:
    """None if ``ip netns add`` works here, else the reason it does not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"octo-t-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"`ip netns add` failed: {getattr(exc, 'stderr', '') or exc}"
    _ip("netns", "del", name)
    return None


def require_netns() -> None:
    """Fail (not skip) the test when namespaces are unavailable: CI runs as root where they work."""
    reason = netns_available()
    if reason is not None:
        pytest.fail(f"this test needs network namespaces: {reason}")


@dataclass(frozen=True)
class Host:
    ns: str
    address: str  # its IPv4 address on the LAN

    def cmd(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs it: same PID)."""
        return ["ip", "netns", "exec", self.ns, *argv]


@contextlib.contextmanager
def lan(names: list[str], *, subnet: int | None = None) -> Iterator[dict[str, Host]]:
    """Namespaces ``names`` on one bridged LAN 10.213.<subnet>.0/24 (hosts .2, .3, ...).

    Yields: name → Host. Teardown deletes every namespace (which removes their links).
    """
    tag = secrets.token_hex(3)
    subnet = subnet if subnet is not None else 1 + secrets.randbelow(250)
    bridge_ns = f"octo-t-{tag}-br"
    created: list[str] = []
    hosts: dict[str, Host] = {}
    try:
        _ip("netns", "add", bridge_ns)
        created.append(bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            ns = f"octo-t-{tag}-{i}"
            _ip("netns", "add", ns)
            created.append(ns)
            # Both ends are created straight inside their namespaces: nothing appears on the host.
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", bridge_ns)
            _ip("-n", bridge_ns, "link", "set", f"p{i}", "master", "br0", "up")
            address = f"10.213.{subnet}.{i + 2}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts[name] = Host(ns, address)
        yield hosts
    finally:
        for ns in reversed(created):
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip("netns", "del", ns)
