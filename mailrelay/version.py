"""The installed distribution's version, for `mailrelay version` and generated files."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    """The installed distribution's version ("unknown" when run from a source tree that is
    not installed)."""
    try:
        return metadata.version("mailrelay")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
