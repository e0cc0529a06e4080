"""`scripts/bench --wan`: replication over shaped links between two network namespaces (issue 8).

A primary (`octofs mount`, its sockets in one namespace) and a target (`octofs serve` in another) on a
veth bridge; the primary's egress is shaped with `tc tbf`. Figures:

  * compress none / auto on a 10 Mbit/s link: seconds from the first write until `wait-synced`
    returns, for log-like text (compressible) and for random bytes (incompressible: `auto` must
    stay out of the way), bytes on the wire and the compression ratio;
  * bandwidth: 1MiB: the sending rate measured from `bytes_sent` (20 %..80 % of the transfer);
  * 50 ms each way (a relay: this kernel has no `netem`) and 1 % packet loss (nftables): the time a
    mixed write workload takes to replicate.

Needs root, `ip netns`, `tc`, `nft` (scripts/setup installs nftables) and FUSE.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.daemons import write_vault_yaml
from tests.support.netns import lan, netns_available
from tests.support.trees import assert_trees_equal
from tests.support.wan import (
    compressible,
    delay_proxy,
    drop_randomly,
    primary_mount,
    sample,
    serve_in,
    shape_rate,
)

MIB = 2**20


def _replicate(hosts, work: Path, secret: Path, target: dict, files: list[bytes], via: tuple[str, int] | None = None,
               rate_sample: bool = False) -> dict:
    """Write ``files`` into a fresh vault whose one target is in the other namespace; time until synced."""
    p, t = hosts["primary"], hosts["target"]
    work.mkdir()
    port = 7070
    serve_yaml = {"root": str(work / "root"), "listen": f"{'127.0.0.1' if via else t.address}:{port}",
                  "secret_file": str(secret), "discovery": False}
    address = f"{via[0]}:{via[1]}" if via else f"{t.address}:{port}"
    vault_yaml = write_vault_yaml(work, name="bench", extra={"secret_file": str(secret),
                                                            "targets": [{"name": "t", "address": address, **target}]})
    with serve_in(t, work, "serve", serve_yaml):
        relay = delay_proxy(t, via, ("127.0.0.1", port), 0.050) if via else None
        if relay is not None:
            relay.__enter__()
        try:
            with primary_mount(p, vault_yaml, work / "mnt") as m:
                m.wait_synced(timeout=120)
                base = m.target_status("t")["bytes_sent"]
                start = time.monotonic()
                for i, data in enumerate(files):
                    (m.mnt / f"f{i}").write_bytes(data)
                samples = []
                if rate_sample:
                    total = sum(map(len, files))
                    samples = sample(lambda: m.target_status("t")["bytes_sent"] - base, until=lambda v: v >= total,
                                     interval=0.1, timeout=600)
                m.wait_synced(timeout=600)
                elapsed = time.monotonic() - start
                st = m.target_status("t")
                assert_trees_equal(m.backing, work / "root" / "bench")
        finally:
            if relay is not None:
                relay.__exit__(None, None, None)
    out = {"seconds": round(elapsed, 3), "bytes_written": sum(map(len, files)),
           "bytes_on_wire": st["bytes_sent"] - base, "compression": st["compression"]}
    if st["bytes_sent"]:
        out["ratio"] = round(st["op_bytes_sent"] / st["bytes_sent"], 2)
    if samples:
        total = sum(map(len, files))
        (t20, v20) = next((t_, v) for t_, v in samples if v >= 0.2 * total)
        (t80, v80) = next((t_, v) for t_, v in samples if v >= 0.8 * total)
        out["rate_bps"] = round((v80 - v20) / (t80 - t20))
    return out


def run_wan(console, *, quick: bool, as_json: bool, workdir: Path | None, keep: bool) -> int:
    """The --wan section of scripts/bench. Returns the exit status."""
    why = netns_available()
    if why is not None:
        console.print(f"[red]--wan needs network namespaces: {why}[/red]")
        return 1
    size = 2 * MIB if quick else 8 * MIB
    work = workdir or Path(tempfile.mkdtemp(prefix="octofs-bench-wan-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    secret = work / "secret"
    secret.write_text("bench\n")
    text = compressible(size, seed=7)
    noise = os.urandom(size)
    results: dict = {}
    with lan(["primary", "target"]) as hosts:
        shape_rate(hosts["primary"], "10mbit")
        for kind, data in (("text", text), ("random", noise)):
            for compress in ("none", "auto"):
                r = _replicate(hosts, work / f"tbf-{kind}-{compress}", secret, {"compress": compress},
                               [data[i * len(data) // 8:(i + 1) * len(data) // 8] for i in range(8)])
                results[f"10mbit/{kind}/{compress}"] = r
                console.print(f"  10 Mbit/s, {size // MIB} MiB {kind}, compress {compress}: {r['seconds']:.2f} s, "
                              f"{r['bytes_on_wire']:,} bytes on the wire"
                              + (f" (ratio {r['ratio']:.1f}x)" if r.get("compression") else ""))
    with lan(["primary", "target"]) as hosts:
        r = _replicate(hosts, work / "bandwidth", secret, {"compress": "none", "bandwidth": "1MiB"},
                       [os.urandom(size // 8) for _ in range(8)], rate_sample=True)
        results["bandwidth-1MiB"] = r
        console.print(f"  bandwidth: 1MiB, {size // MIB} MiB random: measured {r['rate_bps'] / MIB:.3f} MiB/s")
    with lan(["primary", "target"]) as hosts:
        drop_randomly(hosts["primary"], 1)
        drop_randomly(hosts["target"], 1)
        r = _replicate(hosts, work / "delay-loss", secret, {}, [os.urandom(64 * 1024) for _ in range(size // (64 * 1024))],
                       via=(hosts["target"].address, 7071))
        results["delay50ms-loss1pct"] = r
        console.print(f"  50 ms each way + 1 % loss, {size // MIB} MiB in 64 KiB files: {r['seconds']:.2f} s")
    text_none, text_auto = results["10mbit/text/none"]["seconds"], results["10mbit/text/auto"]["seconds"]
    rand_none, rand_auto = results["10mbit/random/none"]["seconds"], results["10mbit/random/auto"]["seconds"]
    console.print(f"  compress auto vs none on 10 Mbit/s: text {text_none / text_auto:.1f}x faster, "
                  f"random {rand_none / rand_auto:.2f}x (1.0 = out of the way)")
    if as_json:
        print(json.dumps({"wan": results}, indent=2))
    if not keep and workdir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0
