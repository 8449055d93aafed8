"""edgefl aggregator: blind summation of encrypted updates, rounds, key holder."""

from edge_sdk._version import __version__

__all__ = ["__version__"]
