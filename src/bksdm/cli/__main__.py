"""``python -m bksdm.cli``: what ``accelerate launch -m bksdm.cli ...`` runs on every process."""

import sys

from bksdm.cli.main import main

sys.exit(main())
