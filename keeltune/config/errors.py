"""The one error a bad config raises: its message names the file, line and key, and the fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem, with the file, line and key when known."""
