"""``python -m secateurs`` runs the command-line tool."""

import sys

from secateurs.cli import main

sys.exit(main())
