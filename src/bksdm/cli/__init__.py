"""``bksdm <command>``: argument parsing only, one module per command family; the jobs live in the stage packages.

``python -m bksdm.cli`` (for ``accelerate launch``) and the ``bksdm`` script both enter through :func:`main`.
"""

import sys

from bksdm.threads import apply_cpu_defaults

try:  # before anything loads torch (OpenMP reads its settings once): see bksdm.threads
    apply_cpu_defaults()
except ValueError as err:
    print(f"bksdm: error: {err}", file=sys.stderr)
    sys.exit(2)
from bksdm.cli.main import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]
