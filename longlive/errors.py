"""Errors a user can fix: bad arguments, missing files, impossible settings.

``longlive.cli.main`` prints these as one line, ``longlive <command>: <message>``, and exits 2; anything
else is a bug and keeps its traceback. So a message must name the problem *and* the fix on its own.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Input that cannot work as given (a ValueError, so library callers that catch those still do)."""


__all__ = ["UsageError"]
