"""compression.py: owns the compression of op batches on the wire (docs/FORMAT.md §7.13): codecs and the `auto` policy.

Invariants:
- Decompression is bounded: a compressed frame must state its content size, and a
  size above the caller's limit is refused before anything is allocated for it
  (a small frame can never expand into an unbounded buffer).
- ``BatchCompressor.compress`` returns None when a batch should go out plain: the
  sender then sends an ordinary `ops` frame, so compression never changes what
  the target applies, only how it travels.

Synchronous and sans I/O; zstandard is the only codec.
"""

from __future__ import annotations

import zstandard

CODECS: tuple[str, ...] = ("zstd",)
MODES = ("none", "auto", "zstd")
AUTO_LEVEL = 1  # fast (hundreds of MB/s per core): stays out of the way on fast links
ZSTD_LEVEL = 3
AUTO_MIN_SAVING = 0.10  # auto compresses while batches shrink by at least this much
AUTO_RETRY_EVERY = 32  # after an incompressible batch, test again every this many batches
MIN_BYTES = 512  # smaller batches are not worth a codec round trip
# auto compresses only while the target lags at least this much (the link, not the primary, is the
# bottleneck); the shipper checks it (shipper.py _op_frame).
AUTO_LAG_S = 0.25


class BatchCompressor:
    """Decides, batch by batch, whether and how to compress (one per connection).

    Args:
        mode: ``"auto"`` (level 1, only while it saves ≥ 10 %) or ``"zstd"`` (always, level 3).

    Attributes:
        raw_bytes: payload bytes offered so far; ``sent_bytes``: what they became.
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("auto", "zstd"):
            raise ValueError(f"compression mode {mode!r}")
        self.mode = mode
        self._cctx = zstandard.ZstdCompressor(level=AUTO_LEVEL if mode == "auto" else ZSTD_LEVEL,
                                              write_content_size=True)
        self._skip = 0  # auto: batches left to send plain before testing again

    def compress(self, data: bytes) -> bytes | None:
        """``data`` compressed, or None to send it plain."""
        if len(data) < MIN_BYTES:
            return None
        if self.mode == "auto" and self._skip > 0:
            self._skip -= 1
            return None
        out = self._cctx.compress(data)
        if self.mode == "auto" and len(out) > len(data) * (1 - AUTO_MIN_SAVING):
            self._skip = AUTO_RETRY_EVERY - 1
            return None
        return out


def decompress(codec_name: str, data: bytes, limit: int) -> bytes:
    """Decompress one frame's data; at most ``limit`` bytes. Raises ValueError."""
    if codec_name != "zstd":
        raise ValueError(f"unknown compression {codec_name!r}")
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ValueError(f"not a zstd frame: {exc}") from None
    if size < 0:
        raise ValueError("the zstd frame does not state its content size")
    if size > limit:
        raise ValueError(f"the zstd frame would expand to {size} bytes, above the limit of {limit}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(1, size))
    except zstandard.ZstdError as exc:
        raise ValueError(f"cannot decompress: {exc}") from None
    if len(out) != size:
        raise ValueError(f"the zstd frame holds {len(out)} bytes, not the {size} it states")
    return out
