"""cli/serve_cmd.py: `octofs serve [SERVE.yaml]`, the target daemon (runs in the foreground)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
from pathlib import Path

from octofs import sdnotify, state
from octofs.cli.common import add_command, setup_logging
from octofs.config import ServeConfig, load_serve_config
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
    p.add_argument("--name", metavar="NAME", help="what `octofs discover` lists this target as (default: host name)")
    p.add_argument("--no-discovery", dest="discovery", action="store_false", default=None,
                   help="do not answer `octofs discover` (SERVE.yaml: discovery: off)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics on HOST:PORT (SERVE.yaml: metrics; default off)")


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
    cfg = load_serve_config(args.serve_yaml, root=args.root, listen=args.listen, secret_file=args.secret_file,
                            discovery=args.discovery, name=args.name, metrics=args.metrics)
    secret = read_secret(cfg.secret_file)
    tls_context(cfg)  # a certificate or key that cannot be loaded is a config error, before anything starts
    setup_logging(args, default_level=logging.INFO)
    import trio  # here, so that `octofs --help` does not import it

    ready = Path(os.path.abspath(args.ready_file)) if args.ready_file else None
    try:
        trio.run(_serve, cfg, secret, ready)
    except BaseExceptionGroup as group:
        # A failure to start (root locked, address in use) arrives wrapped by the
        # nursery; report the one error itself, with its own message and exit code.
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    return 0


def tls_context(cfg: ServeConfig):
    """The server-side SSL context of SERVE.yaml's ``tls:`` (docs/FORMAT.md §7.12), or None."""
    if cfg.tls is None:
        return None
    from octofs import tlsconf
    from octofs.errors import ConfigValueError

    try:
        return tlsconf.server_context(cfg.tls)
    except ValueError as exc:
        raise ConfigValueError(path=str(cfg.path), line="-", key="tls", reason=str(exc)) from None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def _serve(cfg: ServeConfig, secret: bytes, ready: Path | None) -> None:
    """Run ``serve_target`` (and beside it discovery and metrics) until SIGTERM or SIGINT (then exit cleanly)."""
    import trio

    from octofs.replayer import format_address, serve_target

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            bound = await nursery.start(functools.partial(serve_target, with_server=_failover(cfg, secret),
                                                          tls=tls_context(cfg)),
                                        cfg.root, cfg.listen_host, cfg.listen_port, secret)
            extra = await _start_extras(nursery, cfg, bound)
            if ready is not None:
                info = {"pid": os.getpid(), "listen": format_address(*bound), **extra}
                state.write_atomic(ready, json.dumps(info).encode(), 0o644)
            sdnotify.notify("READY=1")  # systemd Type=notify (docs/systemd/octofs-serve@.service)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


async def _start_extras(nursery, cfg: ServeConfig, bound: tuple[str, int]) -> dict:
    """Start the discovery responder and the metrics endpoint, if configured; their addresses for the ready file."""
    import socket

    import trio

    from octofs import __version__, beacon, discovery, exporter, protocol, replica
    from octofs.control import request

    extra: dict = {}
    if not cfg.discovery:
        log.info("discovery is off (SERVE.yaml discovery: off, or --no-discovery)")
    elif beacon.is_loopback(bound[0]):
        log.info("discovery is off: listening on a loopback address, which nobody on the LAN can reach")
    else:
        fingerprint = await trio.to_thread.run_sync(beacon.target_fingerprint, replica.state_root(cfg.root))
        wildcard = bound[0] in ("0.0.0.0", "::", "")
        template = discovery.Answer(
            nonce=b"", name=cfg.name or _host_name(socket.gethostname()), host="" if wildcard else bound[0],
            port=bound[1], version=__version__, protocols=tuple(protocol.SUPPORTED_VERSIONS),
            fingerprint=fingerprint)
        extra["discovery_port"] = await nursery.start(beacon.serve_discovery, template)
    if cfg.metrics is not None:
        socket_path = replica.control_socket_path(cfg.root)

        async def status() -> dict:
            reply = await trio.to_thread.run_sync(lambda: request(socket_path, "status", io_timeout_s=10))
            reply.pop("ok", None)
            return reply

        extra["metrics"] = await nursery.start(exporter.serve_metrics, cfg.metrics[0], cfg.metrics[1], status)
    return extra


def _failover(cfg: ServeConfig, secret: bytes):
    """What runs beside the listener when SERVE.yaml has ``failover:`` or ``health:`` (failover.py), or None."""
    if not cfg.failover and cfg.health is None:
        return None
    from octofs import failover

    watches = [failover.Watch(vault=f.vault, heartbeat_s=f.heartbeat_s, primary=f.primary, witness=f.witness,
                              mount=f.mount, hooks=f.hooks, hook_timeout_s=f.hook_timeout_s, health=f.health,
                              targets=f.targets) for f in cfg.failover]
    assert cfg.secret_file is not None

    async def run(server) -> None:
        await failover.serve_failover(server, watches, secret, cfg.secret_file, cfg.health)

    return run


def _host_name(name: str) -> str:
    """The host name as a discovery name (1-64 of letters, digits, '.', '-', '_')."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in name.split(".")[0])
    cleaned = cleaned.lstrip("._-")[:64]
    return cleaned or "octofs"
