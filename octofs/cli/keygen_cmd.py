"""cli/keygen_cmd.py: `octofs keygen DIR [--name NAME]`: a key and a self-signed certificate for TLS, and its fingerprint."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

from octofs.cli.common import add_command
from octofs.errors import UsageError


def add_parser(sub) -> None:
    p = add_command(sub, "keygen", "Create a private key and a self-signed certificate for TLS (docs/VAULT_YAML.md) "
                                   "and print the certificate's SHA-256 fingerprint.", run)
    p.add_argument("directory", metavar="DIR", help="where NAME.key (mode 0600) and NAME.crt are written")
    p.add_argument("--name", metavar="NAME", help="file names and certificate CN (default: the host name)")
    p.add_argument("--days", type=int, default=3650, metavar="N", help="validity (default 3650)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout (docs/CLI_JSON.md)")


def run(args: argparse.Namespace) -> int:
    from octofs import tlsconf

    directory = Path(args.directory)
    if not directory.is_dir():
        raise UsageError(detail=f"DIR: {directory} is not a directory")
    name = args.name or socket.gethostname().split(".")[0] or "octofs"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name.startswith((".", "-")):
        raise UsageError(detail=f"--name: expected letters, digits, '-', '_' or '.', got {name!r}")
    if not 1 <= args.days <= 36500:
        raise UsageError(detail=f"--days: expected 1 to 36500, got {args.days}")
    try:
        cert, key, fingerprint = tlsconf.keygen(directory, name, args.days)
    except FileExistsError as exc:
        raise UsageError(detail=f"{exc.args[0]} exists already; keygen never overwrites a key or certificate") \
            from None
    except RuntimeError as exc:
        raise UsageError(detail=f"cannot create a key and certificate in {directory}: {exc}") from None
    if args.json:
        print(json.dumps({"cert": str(cert), "key": str(key), "fingerprint": tlsconf.show(fingerprint)}, indent=2))
        return 0
    print(f"key:         {key} (keep it secret)")
    print(f"certificate: {cert}")
    print(f"fingerprint: {tlsconf.show(fingerprint)}")
    print("pin it in the primary's vault.yaml, under the target:   tls: {fingerprint: " + tlsconf.show(fingerprint) + "}")
    return 0
