"""The one name rule: device, holder, federation and role ids.

Every id that appears in a topic, a certificate, a registry or a message is
1-64 characters from ``[A-Za-z0-9_-]``: safe in MQTT topic levels (no ``/``,
``+``, ``#``), in file names and in X.509 common names, and one namespace
across roles. Every check of an id uses :data:`ID_PATTERN`.
"""

from __future__ import annotations

import re

__all__ = ["ID_PATTERN", "is_id"]

#: Matches a whole id (use ``fullmatch``).
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_id(value: object) -> bool:
    """Return whether ``value`` is a str that is a valid id."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None
