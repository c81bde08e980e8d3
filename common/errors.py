"""One base class for every error a user can fix: bad input, settings or state on disk.

Each CLI (`common.cli.command`) prints a `UserError` as one line, `error: <message>`, and exits
1; anything else is a bug and keeps its traceback. Messages name the file or flag and what is
wrong with it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, settings or saved state; the message names where and what."""
