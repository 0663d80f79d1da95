"""``python -m worker``: the ``biot-worker`` command."""

import sys

from worker.cli import main

sys.exit(main())
