"""``python -m genrl`` = the ``genrl`` command (what ``torchrun ... -m genrl train ...`` runs)."""

import sys

from genrl.cli import main

sys.exit(main())
