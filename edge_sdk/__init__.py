"""edgefl device SDK: local training, on-device privacy, encryption and transport.

The public API is re-exported here as it lands; see ``__all__``.
"""

from edge_sdk._version import __version__
from edge_sdk.errors import EdgeFLError

__all__ = ["EdgeFLError", "__version__"]
