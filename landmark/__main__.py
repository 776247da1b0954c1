"""``python -m landmark`` runs the ``landmark`` command line."""

import sys

from landmark.cli import main

sys.exit(main())
