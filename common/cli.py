"""The wrapper every `main(argv=None)` goes through: a UserError becomes one line on stderr and
exit status 1, and so does what the machine refuses (a full disk, a read-only folder, no
permission); the libraries' `logging.info` lines are shown. Tests call `main([...])` and read
the status."""

from __future__ import annotations

import errno
import functools
import logging
import sys
from typing import Callable

from common.errors import UserError


def command(fn: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorate `main(argv)`: its return value (None: 0), or 1 after printing a UserError."""
    @functools.wraps(fn)
    def main(argv: list[str] | None = None) -> int:
        if not logging.getLogger().handlers:  # the libraries' progress lines (logging.info) on stderr
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            # Accelerate's own INFO lines ("Saving current state to ...", five per save) are not ours to show
            logging.getLogger("accelerate").setLevel(logging.WARNING)
        try:
            return fn(argv) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            if e.errno not in REFUSED:
                raise
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e} ({REFUSED[e.errno]}; files written completely are kept, "
                  "a file being written was not put in place: run the same command again)", file=sys.stderr)
            return 1
    return main


REFUSED = {  # what the machine refuses, and what to do about it
    errno.ENOSPC: "the disk is full: free space", errno.EDQUOT: "over the disk quota: free space",
    errno.EROFS: "a read-only file system: write elsewhere", errno.EACCES: "no permission: write elsewhere",
    errno.EPERM: "not permitted: write elsewhere"}
