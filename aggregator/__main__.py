"""``python -m aggregator``: the aggregator-side commands of ``edgefl``."""

import sys

from edge_sdk.cli import main

if __name__ == "__main__":
    sys.exit(
        main(sys.argv[1:], prog="python -m aggregator", only=("aggregator", "keyholder", "status"))
    )
