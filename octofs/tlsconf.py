"""tlsconf.py: owns TLS for the replication link (docs/FORMAT.md §7.12): SSL contexts, certificate fingerprints, `octofs keygen`.

Invariants:
- A peer is identified by its certificate, never by a host name: either its
  SHA-256 fingerprint is pinned, or it must chain to a configured CA file.
  ``check_hostname`` is off because targets are usually reached by address.
- TLS 1.2 is the minimum; Python's defaults choose the ciphers.
- A primary never runs TLS without checking the target (a fingerprint or a CA
  is required, config.py enforces it); a target without ``ca`` asks for no
  client certificate (the shared secret authenticates the primary).

Synchronous; the streams are wrapped in link.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class TlsSettings:
    """``tls:`` of a target in vault.yaml or of SERVE.yaml, checked by config.py.

    Attributes:
        cert, key: our certificate and private key (PEM), or None (a primary needs
            them only when the target checks clients).
        fingerprint: the pinned SHA-256 fingerprint of the peer's certificate
            (64 lowercase hex digits), or None.
        ca: a PEM file of certificates the peer's certificate must chain to, or None.
    """

    cert: Path | None = None
    key: Path | None = None
    fingerprint: str | None = None
    ca: Path | None = None


@dataclass(frozen=True)
class ClientTls:
    """What the primary's side of a connection needs: the context and the pin."""

    context: ssl.SSLContext
    fingerprint: str | None
    ca: Path | None


def normalize_fingerprint(text: str) -> str:
    """``sha256:AB:CD:…``, ``AB:CD…`` or 64 hex digits → 64 lowercase hex digits. Raises ValueError."""
    value = text.strip().lower()
    value = value.removeprefix("sha256:")
    value = value.replace(":", "")
    if not _HEX64.match(value):
        raise ValueError(f"expected a SHA-256 fingerprint (64 hex digits, as `octofs keygen` prints), got {text!r}")
    return value


def fingerprint_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def fingerprint_file(cert: Path) -> str:
    """The SHA-256 fingerprint of the first certificate in a PEM file. Raises ValueError."""
    try:
        pem = Path(cert).read_text()
        start = pem.index("-----BEGIN CERTIFICATE-----")
        end = pem.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        der = ssl.PEM_cert_to_DER_cert(pem[start:end])
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a PEM certificate from {cert}: {exc}") from None
    return fingerprint_der(der)


def show(fingerprint: str) -> str:
    return f"sha256:{fingerprint}"


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _load_chain(ctx: ssl.SSLContext, s: TlsSettings) -> None:
    if s.cert is None:
        return
    try:
        ctx.load_cert_chain(s.cert, s.key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the certificate {s.cert} with the key {s.key}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, s: TlsSettings) -> None:
    try:
        ctx.load_verify_locations(cafile=str(s.ca))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the CA file {s.ca}: {exc}") from None


def client_tls(s: TlsSettings) -> ClientTls:
    """The primary's side. Raises ValueError (a file that cannot be loaded)."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if s.ca is not None:
        _load_ca(ctx, s)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        # Pinned: any certificate is accepted by the handshake, then its fingerprint
        # must be the pinned one (link.py) before a single frame is sent.
        ctx.verify_mode = ssl.CERT_NONE
    _load_chain(ctx, s)
    return ClientTls(ctx, s.fingerprint, s.ca)


def server_context(s: TlsSettings) -> ssl.SSLContext:
    """The target's side. Raises ValueError (a file that cannot be loaded)."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, s)
    if s.ca is not None:
        _load_ca(ctx, s)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def describe_failure(exc: BaseException | None, *, our_side: str = "primary") -> str:
    """A readable reason for a failed TLS handshake (``exc`` is the ssl.SSLError, or None for EOF)."""
    if not isinstance(exc, ssl.SSLError):
        return f"the peer closed the connection during the TLS handshake ({exc or 'EOF'})"
    reason = (exc.reason or "").upper()
    verify = getattr(exc, "verify_message", None)
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason or "HTTP_REQUEST" in reason \
            or "PACKET_LENGTH_TOO_LONG" in reason or "UNEXPECTED_RECORD" in reason:
        return "the peer does not speak TLS (is tls: set on both sides?)"
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        return f"the peer's certificate is not trusted by the CA file: {verify or reason.lower()}"
    if "CERTIFICATE_REQUIRED" in reason or "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason:
        return "the target requires a client certificate (tls: cert and key), and none was sent" \
            if our_side == "primary" else "the primary sent no client certificate"
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" in reason:
        return "the peer refused our certificate (not signed by the CA file it trusts)"
    return f"TLS handshake failed: {exc.reason or exc}"


# -- octofs keygen ------------------------------------------------------------------


def keygen(directory: Path, name: str, days: int = 3650) -> tuple[Path, Path, str]:
    """Create ``NAME.key`` (EC P-256, mode 0600) and a self-signed ``NAME.crt`` in ``directory``.

    Uses the ``openssl`` command (Debian's openssl package).

    Returns:
        (certificate path, key path, SHA-256 fingerprint).

    Raises:
        FileExistsError: either file exists already (never overwritten).
        RuntimeError: openssl is missing or failed (its message).
    """
    directory = Path(directory)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    for p in (cert, key):
        if p.exists():
            raise FileExistsError(p)
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("the openssl command is not installed (apt-get install openssl)")
    tmp_key = directory / f".{name}.key.tmp"
    tmp_key.unlink(missing_ok=True)
    os.close(os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # openssl keeps the mode: never readable
    try:
        proc = subprocess.run(
            [exe, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(tmp_key), "-out", str(cert), "-days", str(days), "-subj", f"/CN={name}",
             "-addext", f"subjectAltName=DNS:{name}"],
            capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            cert.unlink(missing_ok=True)
            raise RuntimeError(f"openssl req failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        tmp_key.rename(key)
    finally:
        tmp_key.unlink(missing_ok=True)
    return cert, key, fingerprint_file(cert)
