"""``python -m firmware_sim``: the simulator-side commands of ``edgefl``."""

import sys

from edge_sdk.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m firmware_sim", only=("sim", "demo", "broker")))
