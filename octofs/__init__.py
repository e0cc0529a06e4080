"""octofs: real-time data mirroring captured at the VFS layer."""

__version__ = "0.1.0"
