"""cli/serve_cmd.py: `octofs serve [SERVE.yaml]`, the target daemon (runs in the foreground)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from pathlib import Path

from octofs import state
from octofs.cli.common import add_command, setup_logging
from octofs.config import load_serve_config
from octofs.errors import ConfigFileError, UsageError

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = add_command(sub, "serve", "Receive vaults from primaries and keep a replica dir of each under a root.", run)
    p.add_argument("serve_yaml", nargs="?", metavar="SERVE.yaml", help="the target's configuration file (optional)")
    p.add_argument("--root", metavar="DIR", help="the folder holding one replica dir per received vault")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:7070; port 0 = any)")
    p.add_argument("--secret-file", metavar="FILE", help="the shared secret for mutual authentication")
    p.add_argument("--ready-file", metavar="PATH",
                   help='once listening, write {"pid": ..., "listen": "HOST:PORT"} to PATH')


def read_secret(path: Path | None) -> bytes:
    """The shared secret: the file's bytes without leading or trailing whitespace; never empty.

    Raises:
        UsageError: no secret file configured.
        ConfigFileError: the file cannot be read or holds no secret.
    """
    if path is None:
        raise UsageError(detail="no shared secret: give --secret-file FILE or set secret_file in SERVE.yaml")
    try:
        secret = path.read_bytes().strip()  # exactly as the primary reads its secret_file (daemon.py)
    except OSError as exc:
        raise ConfigFileError(path=str(path), reason=exc.strerror or str(exc)) from exc
    if not secret:
        raise ConfigFileError(path=str(path), reason="the file is empty; a shared secret is required")
    return secret


def run(args: argparse.Namespace) -> int:
    cfg = load_serve_config(args.serve_yaml, root=args.root, listen=args.listen, secret_file=args.secret_file)
    secret = read_secret(cfg.secret_file)
    setup_logging(args, default_level=logging.INFO)
    import trio  # here, so that `octofs --help` does not import it

    ready = Path(os.path.abspath(args.ready_file)) if args.ready_file else None
    try:
        trio.run(_serve, cfg.root, cfg.listen_host, cfg.listen_port, secret, ready)
    except BaseExceptionGroup as group:
        # A failure to start (root locked, address in use) arrives wrapped by the
        # nursery; report the one error itself, with its own message and exit code.
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    return 0


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def _serve(root: Path, host: str, port: int, secret: bytes, ready: Path | None) -> None:
    """Run ``serve_target`` until SIGTERM or SIGINT (then exit cleanly)."""
    import trio

    from octofs.replayer import format_address, serve_target

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            bound = await nursery.start(serve_target, root, host, port, secret)
            if ready is not None:
                info = {"pid": os.getpid(), "listen": format_address(*bound)}
                state.write_atomic(ready, json.dumps(info).encode(), 0o644)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
