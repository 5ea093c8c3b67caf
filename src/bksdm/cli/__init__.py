"""``bksdm <command>``: argument parsing only, one module per command family; the jobs live in the stage packages.

``python -m bksdm.cli`` (for ``accelerate launch``) and the ``bksdm`` script both enter through :func:`main`.
"""

from bksdm.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
