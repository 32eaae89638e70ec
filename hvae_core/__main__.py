"""``python -m hvae_core`` is the ``hvae`` command."""

from hvae_core.cli import main

main()
