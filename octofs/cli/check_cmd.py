"""cli/check_cmd.py: `octofs check VAULT.yaml`: validate the file, then probe every target (docs/FORMAT.md §7.11).

One line per target says what was found; the exit status is 0 only when every
target is usable, else the exit code of the first problem (41 unreachable, 42
version, 43 stale epoch, 44 secret, 46 low space, 47 certificate, 48 another vault
under this name; 10-13 for the file itself).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path

from octofs.cli.common import add_command
from octofs.errors import (
    ConfigFileError,
    ConfigValueError,
    OctofsError,
    PeerEpochError,
    PeerSpaceError,
    PeerVaultError,
    UsageError,
)

# What each exit code is called in the per-target line.
_KINDS = {41: "unreachable", 42: "incompatible version", 43: "stale epoch", 44: "wrong secret",
          45: "protocol error", 46: "low space", 47: "certificate", 48: "another vault"}


def add_parser(sub) -> None:
    p = add_command(sub, "check", "Validate a vault.yaml and check every target: reachable, authenticated, "
                                  "protocol version, free space, epoch.", run)
    p.add_argument("vault_yaml", metavar="VAULT.yaml")
    p.add_argument("--target", metavar="NAME", help="check only this target")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per target (default 10)")
    p.add_argument("--min-free", metavar="SIZE", default="0",
                   help="also require this much free space on each target beyond what the vault needs "
                        "(e.g. 10GiB; default 0)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout (docs/CLI_JSON.md)")


def run(args: argparse.Namespace) -> int:
    from octofs import config, tlsconf

    cfg = config.load_vault_config(args.vault_yaml)
    try:
        min_free = config.parse_size(args.min_free)
    except ValueError as exc:
        raise UsageError(detail=f"--min-free: {exc}") from None
    if not 0 < args.timeout <= 600:
        raise UsageError(detail=f"--timeout: expected seconds from 0 to 600, got {args.timeout:g}")
    targets = [t for t in cfg.targets if args.target in (None, t.name)]
    if args.target is not None and not targets:
        raise UsageError(detail=f"--target: vault {cfg.vault} has no target named {args.target!r}")
    if not targets:
        _emit(args, cfg, [], {"vault_bytes": 0, "journal_bytes": 0})
        return 0
    secret = _secret(cfg)
    tls = {}
    for i, t in enumerate(cfg.targets):
        if t.tls is not None and t in targets:
            try:
                tls[t.name] = tlsconf.client_tls(t.tls)
            except ValueError as exc:
                raise ConfigValueError(path=args.vault_yaml, line="-", key=f"targets[{i}].tls", reason=str(exc)) \
                    from None
    vault_id, epoch, known = _identity(cfg.state_dir)
    need = {"vault_bytes": _used_bytes(cfg.backing), "journal_bytes": _used_bytes(cfg.state_dir / "journal")}

    import trio

    from octofs.probe import probe_target

    results: dict[str, object] = {}

    async def one(t) -> None:
        try:
            results[t.name] = await probe_target(
                t.host, t.port, peer=f"{t.name} ({_address(t)})", vault=cfg.vault, vault_id=vault_id, epoch=epoch,
                secret=secret, tls=tls.get(t.name), timeout_s=args.timeout)
        except OctofsError as exc:
            results[t.name] = exc

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for t in targets:
                nursery.start_soon(one, t)

    trio.run(main)
    rows = [_evaluate(t, results[t.name], need, min_free, epoch, known, cfg.vault) for t in targets]
    _emit(args, cfg, rows, need)
    for row in rows:
        if row["error"] is not None:
            raise row["error"]
    return 0


def _secret(cfg) -> bytes:
    if cfg.secret_file is None:
        raise ConfigValueError(path=str(cfg.path), line="-", key="secret_file",
                               reason="required when targets are configured")
    try:
        secret = cfg.secret_file.read_bytes().strip()  # as the mount daemon reads it
    except OSError as exc:
        raise ConfigFileError(path=str(cfg.secret_file), reason=exc.strerror or str(exc)) from None
    if not secret:
        raise ConfigFileError(path=str(cfg.secret_file), reason="the file is empty; a shared secret is required")
    return secret


def _identity(state_dir: Path) -> tuple[bytes, int, bool]:
    """(vault id, epoch, whether the vault was ever mounted) — read only: check creates nothing."""
    from octofs import paths

    try:
        vid = bytes.fromhex(paths.vault_id_path(state_dir).read_text().strip())
        known = True
    except (FileNotFoundError, ValueError):
        vid, known = secrets.token_bytes(16), False  # never mounted: the target cannot know it either
    try:
        epoch = int(paths.epoch_path(state_dir).read_text().strip())
    except (FileNotFoundError, ValueError):
        epoch = 1
    return vid, epoch, known


def _used_bytes(top: Path) -> int:
    """Disk space used by the files under ``top`` (allocated blocks; symlinks not followed)."""
    total = 0
    stack = [top]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
        except OSError:
            continue
    return total


def _address(t) -> str:
    return f"[{t.host}]:{t.port}" if ":" in t.host else f"{t.host}:{t.port}"


def _evaluate(t, result, need: dict, min_free: int, epoch: int, known: bool, vault: str) -> dict:
    """One target's row: what was found, and the error (or None)."""
    from octofs import tlsconf

    row: dict = {"name": t.name, "address": _address(t), "ok": False, "problem": None, "exit_code": 0,
                 "message": "", "error": None, "info": None}
    peer = f"{t.name} ({row['address']})"
    if isinstance(result, OctofsError):
        row.update(problem=_KINDS.get(result.exit_code, "error"), exit_code=result.exit_code,
                   message=result.message, error=result)
        return row
    info, welcome = result.info, result.welcome
    tls_text = "plain TCP" if t.tls is None else (
        f"TLS, certificate pinned {tlsconf.show(t.tls.fingerprint)[:19]}…" if t.tls.fingerprint else
        f"TLS, certificate checked against {t.tls.ca}")
    if info is None:  # a target that predates the probe answered with a Welcome
        row["ok"] = True
        row["message"] = (f"ok: protocol {result.version}, {tls_text}; this target predates the probe (no free "
                          f"space or epoch report), acked seq {welcome.acked_seq}, epoch {welcome.epoch}")
        return row
    row["info"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                   ((f, getattr(info, f)) for f in info.__dataclass_fields__)}
    needed = min_free + need["journal_bytes"] + (0 if info.vault_known else need["vault_bytes"])
    found = (f"protocol {result.version} (target speaks {list(info.versions)}, octofs {info.software}), {tls_text}, "
             f"epoch {info.epoch} (ours {epoch}), "
             + (f"vault known, applied seq {info.applied_seq}"
                + ("" if info.consistent else f", not consistent ({info.needs_resync or 'Synchronize pending'})")
                + (", primary connected" if info.connected else "")
                if info.vault_known else "vault not received yet (the first connection sends it all)")
             + f", free {_human(info.free_bytes)} of {_human(info.total_bytes)} (needs {_human(needed)})")
    error: OctofsError | None = None
    if not info.vault_id_matches:
        error = PeerVaultError(peer=peer, vault=vault,
                               reason="its recorded vault id differs (a different vault with the same name)"
                               if known else "this vault was never mounted, yet the target holds one of that name")
    elif info.epoch > epoch:
        error = PeerEpochError(f"Target {peer} has seen epoch {info.epoch}, higher than this vault's {epoch}: "
                               "this primary is stale (a failover happened)", peer=peer)
    elif info.free_bytes < needed:
        error = PeerSpaceError(peer=peer, free=_human(info.free_bytes), needed=_human(needed))
    if error is not None:
        row.update(problem=_KINDS[error.exit_code], exit_code=error.exit_code, message=f"{error.message}; {found}",
                   error=error)
    else:
        row.update(ok=True, message=f"ok: {found}")
    return row


def _human(n: int) -> str:
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def _emit(args: argparse.Namespace, cfg, rows: list[dict], need: dict) -> None:
    if args.json:
        doc = {"vault": cfg.vault, "ok": all(r["ok"] for r in rows), "vault_bytes": need["vault_bytes"],
               "journal_bytes": need["journal_bytes"],
               "targets": [{k: v for k, v in r.items() if k != "error"} for r in rows]}
        print(json.dumps(doc, indent=2))
        return
    print(f"vault {cfg.vault}: {cfg.path} is valid; backing {cfg.backing} uses {_human(need['vault_bytes'])}, "
          f"journal {_human(need['journal_bytes'])}; {len(rows)} target(s) checked")
    for r in rows:
        kind = "" if r["ok"] else f"{r['problem'].upper()}: "
        print(f"  {r['name']} {r['address']}: {kind}{r['message']}")
