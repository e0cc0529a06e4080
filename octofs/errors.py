"""errors.py: owns the OctofsError hierarchy, its messages and its exit codes.

Invariant: every class has its own exit code (checked by a test against
docs/EXIT_CODES.md, which scripts/errorlist.py generates). The class docstring's
first line is the message template, filled from the keyword arguments given to
the constructor; ``hint`` is an optional second line for the user.

::

    OctofsError                      1   unexpected (traceback logged)
    ├── UsageError                   2   bad flag or argument
    ├── DifferencesFoundError        3   `sync --verify-only` found the target differs
    ├── ConfigError                  10  vault.yaml / SERVE.yaml problems
    │   ├── ConfigFileError          11  missing or unreadable file
    │   ├── ConfigSyntaxError        12  not valid YAML
    │   └── ConfigValueError         13  unknown key, wrong type, bad value
    ├── MountError                   20  generic mount failure
    │   ├── MountpointError          21  missing, not a directory, not empty, already mounted
    │   ├── FuseUnavailableError     22  /dev/fuse or fusermount3 missing
    │   ├── MountStartError          23  the mount daemon exited before the mount was live
    │   └── NotMountedError          24  umount of something that is not an octofs mount
    ├── JournalError                 30  generic journal failure
    │   ├── JournalCorruptError      31  CRC mismatch / bad record before the tail
    │   ├── JournalVersionError      32  written by an unsupported format version
    │   ├── JournalFullError         33  disk full or journal max_size reached
    │   └── JournalIOError           34  EIO and other OS errors on a segment
    ├── OpError                      35  an op that is malformed or escapes the vault
    ├── PeerError                    40  generic peer failure
    │   ├── PeerConnectError         41  cannot connect
    │   ├── PeerVersionError         42  protocol version mismatch
    │   ├── PeerEpochError           43  stale epoch
    │   ├── PeerAuthError            44  authentication failed
    │   ├── ProtocolError            45  malformed frame
    │   ├── PeerSpaceError           46  the target has too little free space (octofs check)
    │   ├── PeerCertificateError     47  TLS: wrong or missing certificate, or no TLS
    │   └── PeerVaultError           48  the target holds another vault under this name
    ├── DaemonError                  50  generic daemon failure
    │   ├── DaemonNotRunningError    51  no daemon answers on the control socket
    │   ├── DaemonRunningError       52  already running (lock held)
    │   ├── WaitTimeoutError         53  a --wait-* barrier timed out
    │   ├── FreezeError              54  a vault cannot be frozen (octofs freeze / snapshot)
    │   ├── FreezeLostError          55  the freeze ended before the backup did
    │   └── SnapshotError            56  octofs snapshot could not copy
    signals                          128+N
"""

from __future__ import annotations

import string


class OctofsError(Exception):
    """An unexpected error occurred: {detail}."""

    exit_code = 1
    hint: str | None = None

    def __init__(self, message: str | None = None, /, **fields: object) -> None:
        self.fields = fields
        if message is None:
            template = (self.__class__.__doc__ or "").strip().splitlines()[0]
            message = _fill(template, fields)
        self.message = message
        super().__init__(message)

    @property
    def hint_text(self) -> str | None:
        """The hint with its fields filled in, or None."""
        if self.hint is None:
            return None
        return _fill(self.hint, self.fields)


def _fill(template: str, fields: dict[str, object]) -> str:
    """Fill {name} fields; a missing field stays visible as {name} rather than raising."""

    class _Keep(dict):
        def __missing__(self, key: str) -> str:
            return "{" + key + "}"

    return string.Formatter().vformat(template, (), _Keep(fields))


class UsageError(OctofsError):
    """{detail}"""

    exit_code = 2


class DifferencesFoundError(OctofsError):
    """The target copy differs from the primary: {count} difference(s) found by verify"""

    exit_code = 3
    hint = "run `octofs sync` to repair them"


# -- configuration ----------------------------------------------------------


class ConfigError(OctofsError):
    """{path}: {detail}"""

    exit_code = 10


class ConfigFileError(ConfigError):
    """Cannot read {path}: {reason}"""

    exit_code = 11


class ConfigSyntaxError(ConfigError):
    """{path}:{line}: not valid YAML: {reason}"""

    exit_code = 12


class ConfigValueError(ConfigError):
    """{path}:{line}: {key}: {reason}"""

    exit_code = 13


# -- mounting ----------------------------------------------------------------


class MountError(OctofsError):
    """Cannot mount {mountpoint}: {reason}"""

    exit_code = 20


class MountpointError(MountError):
    """Cannot mount on {mountpoint}: {reason}"""

    exit_code = 21


class FuseUnavailableError(MountError):
    """FUSE is not available on this machine: {reason}"""

    exit_code = 22
    hint = "Install the fuse3 package and make sure /dev/fuse exists."


class MountStartError(MountError):
    """The mount daemon for {mountpoint} exited before the mount was live: {reason}"""

    exit_code = 23
    hint = "See the daemon log at {log_path}."


class NotMountedError(MountError):
    """{mountpoint} is not an octofs mount"""

    exit_code = 24


# -- journal -----------------------------------------------------------------


class JournalError(OctofsError):
    """Journal {path}: {reason}"""

    exit_code = 30


class JournalCorruptError(JournalError):
    """Journal segment {path} is corrupt at offset {offset}: {reason}"""

    exit_code = 31
    hint = "Run 'octofs debug dump-journal {journal_dir}' and see docs/FORMAT.md, section Recovery."


class JournalVersionError(JournalError):
    """Journal segment {path} has format version {version}, this octofs reads {supported}"""

    exit_code = 32


class JournalFullError(JournalError):
    """Cannot append to journal {path}: {reason}"""

    exit_code = 33


class JournalIOError(JournalError):
    """Cannot write journal {path}: {reason}"""

    exit_code = 34


class OpError(OctofsError):
    """Invalid op: {reason}"""

    exit_code = 35


# -- peers -------------------------------------------------------------------


class PeerError(OctofsError):
    """Peer {peer}: {reason}"""

    exit_code = 40


class PeerConnectError(PeerError):
    """Cannot connect to {peer}: {reason}"""

    exit_code = 41


class PeerVersionError(PeerError):
    """Peer {peer} speaks protocol version {theirs}, this octofs speaks {ours}"""

    exit_code = 42


class PeerEpochError(PeerError):
    """Peer {peer} has epoch {theirs}, higher than ours ({ours}): this primary is stale"""

    exit_code = 43


class PeerAuthError(PeerError):
    """Authentication with {peer} failed: {reason}"""

    exit_code = 44


class ProtocolError(PeerError):
    """Protocol violation from {peer}: {reason}"""

    exit_code = 45


class PeerSpaceError(PeerError):
    """Target {peer} has too little free space: {free} free, the vault needs {needed}"""

    exit_code = 46


class PeerCertificateError(PeerError):
    """TLS with {peer} failed: {reason}"""

    exit_code = 47
    hint = "Compare the tls: settings of vault.yaml and SERVE.yaml (docs/VAULT_YAML.md, TLS)."


class PeerVaultError(PeerError):
    """Target {peer} holds another vault named {vault}: {reason}"""

    exit_code = 48


# -- daemons -----------------------------------------------------------------


class DaemonError(OctofsError):
    """Daemon problem: {reason}"""

    exit_code = 50


class DaemonNotRunningError(DaemonError):
    """No octofs daemon answers at {socket}: {reason}"""

    exit_code = 51


class DaemonRunningError(DaemonError):
    """Vault {vault} is already mounted (state directory {state_dir} is locked)"""

    exit_code = 52


class WaitTimeoutError(DaemonError):
    """Timed out after {timeout_s} s waiting for {what}"""

    exit_code = 53


class FreezeError(DaemonError):
    """Cannot freeze vault {vault}: {reason}"""

    exit_code = 54


class FreezeLostError(DaemonError):
    """The freeze of vault {vault} ended before {what} finished ({how}): the copy may have changed while it ran"""

    exit_code = 55
    hint = "give a longer --max, and see `octofs status --root` (last_freeze)"


class SnapshotError(DaemonError):
    """Snapshot of vault {vault} into {dest} failed: {reason}"""

    exit_code = 56
