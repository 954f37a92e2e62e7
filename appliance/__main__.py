"""``python -m appliance`` is the ``sluice`` command."""

import sys

from .cli import main

sys.exit(main())
