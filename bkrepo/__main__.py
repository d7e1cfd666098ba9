"""``python -m bkrepo`` runs the ``bkr`` command line."""

from bkrepo.cli import main

main()
