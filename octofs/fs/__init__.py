"""fs: the primary's FUSE layer; the only package that imports pyfuse3."""
