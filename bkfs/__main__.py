"""``python -m bkfs`` runs the ``bkfs`` command line (and is how the daemon is started)."""

from bkfs.cli import main

main()
