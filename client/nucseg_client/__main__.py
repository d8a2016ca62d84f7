"""``python -m nucseg_client``: the same as the ``nucseg-client`` command."""

import sys

from nucseg_client.cli import main

sys.exit(main())
