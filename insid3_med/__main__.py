"""``python -m insid3_med``: the same as the ``insid3-med`` command."""

import sys

from insid3_med.cli import main

sys.exit(main())
