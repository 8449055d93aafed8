"""``python -m firmware_sim``: the ``edgefl sim`` command group."""

import sys

from edge_sdk.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m firmware_sim", only="sim"))
