"""bkfs: the lazy FUSE filesystem over a bkr repository (see README)."""
