"""cli/failback_cmd.py: `octofs failback VAULT.yaml`, the way back after a takeover (docs/FORMAT.md §11.5)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from octofs.cli.common import add_command
from octofs.errors import DaemonError, UsageError


def add_parser(sub) -> None:
    p = add_command(sub, "failback", "On an old primary that is fenced: receive the vault back from the new "
                    "primary (only what differs is sent), then take it over again.", run)
    p.add_argument("vault_yaml", metavar="VAULT.yaml", help="this old primary's vault.yaml")
    p.add_argument("--root", required=True, metavar="ROOT",
                   help="the root of this machine's `octofs serve` (the backing dir must be ROOT/VAULT)")
    p.add_argument("--from", dest="from_", required=True, metavar="HOST:PORT",
                   help="the new primary's health responder (its failover.health)")
    p.add_argument("--to", required=True, metavar="HOST:PORT",
                   help="this machine's `octofs serve` health responder (SERVE.yaml health:), which takes over")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="how long to wait for the Synchronize and the handover (default 600)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")


def _address(text: str, flag: str) -> tuple[str, int]:
    from octofs.config import DEFAULT_HEALTH_PORT, _parse_address

    try:
        host, port = _parse_address(text, listen=False)
    except ValueError as exc:
        raise UsageError(detail=f"{flag}: {exc}") from None
    return host, port if ":" in text.rpartition("]")[2] else DEFAULT_HEALTH_PORT


def run(args: argparse.Namespace) -> int:
    import trio

    from octofs import health, replica
    from octofs.cli import umount_cmd
    from octofs.config import load_vault_config
    from octofs.control import request
    from octofs.errors import DaemonNotRunningError
    from octofs.mounttab import octofs_mounts

    cfg = load_vault_config(args.vault_yaml)
    source, to = _address(args.from_, "--from"), _address(args.to, "--to")
    root = Path(os.path.abspath(args.root))
    if cfg.backing.resolve() != root.resolve() / cfg.vault:
        raise UsageError(detail=f"the backing dir {cfg.backing} is not {root / cfg.vault}: failback receives the vault "
                                "into the backing dir through `octofs serve --root ROOT`")
    if cfg.secret_file is None:
        raise UsageError(detail=f"{cfg.path}: secret_file is needed to talk to the new primary")
    secret = cfg.secret_file.read_bytes().strip()
    serve_socket = replica.control_socket_path(root)
    # 1. The fenced mount goes away: from now on only the local serve writes the backing dir.
    for entry in octofs_mounts():
        if Path(entry.source).resolve() == cfg.state_dir.resolve():
            try:
                st = request(Path(entry.source) / "control.sock", "status", io_timeout_s=10)
            except DaemonNotRunningError:
                st = {}
            if st and not st.get("fenced"):
                raise UsageError(detail=f"vault {cfg.vault} is mounted on {entry.mountpoint} and not fenced: it is "
                                        "the primary; failback is for an old primary after a takeover")
            umount_cmd.run(argparse.Namespace(mountpoint=str(entry.mountpoint), lazy=False, quiet=True))
            if not args.quiet and not args.json:
                print(f"octofs: unmounted the fenced vault {cfg.vault} from {entry.mountpoint}")

    async def synchronize_and_switch() -> dict:
        started = trio.current_time()
        shown = None
        with trio.move_on_after(args.timeout):
            while True:
                # 2. The new primary streams to the local serve; a Synchronize repairs what differs.
                try:
                    st = await trio.to_thread.run_sync(lambda: request(serve_socket, "status", io_timeout_s=10))
                except DaemonNotRunningError as exc:
                    raise DaemonError(reason=f"no `octofs serve --root {root}` answers: {exc.message}") from None
                [v] = [v for v in st.get("vaults", []) if v.get("vault") == cfg.vault] or [{}]
                alive = await health.probe(source, cfg.vault, secret, timeout_s=1.0)
                if alive is None or alive.role != "primary":
                    raise DaemonError(reason=f"the new primary at {health.format_address(*source)} does not answer as "
                                             f"the primary of vault {cfg.vault} ({alive})")
                caught_up = (v.get("consistent") and v.get("connected") and v.get("epoch") == alive.epoch
                             and (v.get("durable_seq") or 0) >= alive.seq)
                state = (f"applied {v.get('durable_seq')} of {alive.seq}, "
                         f"{'consistent' if v.get('consistent') else 'synchronizing'}")
                if state != shown and not args.quiet and not args.json:
                    print(f"octofs: vault {cfg.vault}: {state}")
                    shown = state
                if caught_up:
                    break
                await trio.sleep(0.2)
            # 3. Caught up: ask the new primary to hand the vault over (drain, ack, takeover here).
            answer = await health.request_failback(
                source, cfg.vault, secret, epoch=alive.epoch, seq=v["durable_seq"], to=health.format_address(*to),
                timeout_s=max(10.0, args.timeout - (trio.current_time() - started)))
            if answer is None:
                raise DaemonError(reason="the new primary did not answer the failback request")
            return {"accepted": bool(answer.get("accepted")), "reason": answer.get("reason"),
                    "seq": answer.get("seq"), "epoch": answer.get("epoch"),
                    "op_bytes_received": v.get("op_bytes_received")}
        raise DaemonError(reason=f"vault {cfg.vault} was not caught up with the new primary within {args.timeout:g} s")

    result = trio.run(synchronize_and_switch)
    if args.json:
        print(json.dumps(result))
    if not result["accepted"]:
        raise DaemonError(reason=f"the new primary refused the failback: {result['reason']}")
    if not args.json and not args.quiet:
        print(f"octofs: vault {cfg.vault} is back: this machine's octofs serve took it over at epoch {result['epoch']} "
              f"(seq {result['seq']}); the other machine receives it as a target")
    return 0
