"""``python -m aggregator``: the ``edgefl aggregator`` command group."""

import sys

from edge_sdk.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m aggregator", only="aggregator"))
