"""edgefl fleet simulator: simulated devices, broker harness, fault proxy, demo."""

from edge_sdk._version import __version__

__all__ = ["__version__"]
