"""The one channel for what training says: `logging`, through Accelerate's adapter, so a line is
the main process's unless it is asked of every process (`main_process_only=False`).

    log = get_logger(__name__)
    log.info("global batch: ...")                                   # the main process
    log.info("rank 1/2: 24 batches this run", main_process_only=False)  # every process

Lines at INFO go to stdout, warnings and errors to stderr, each in one write (processes that
share a terminal or a pipe do not interleave mid-line) and through tqdm (a progress bar is
redrawn below the line, not cut by it).
"""

from __future__ import annotations

import logging
import sys

from accelerate.logging import MultiProcessAdapter
from tqdm import tqdm


class TqdmHandler(logging.Handler):
    """INFO on stdout, WARNING and above on stderr, one write a line, around tqdm's bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            tqdm.write(self.format(record) + "\n", file=stream, end="")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


class Adapter(MultiProcessAdapter):
    """Accelerate's main-process filter, without its "[RANK i]" prefix: a line that every process
    writes names its rank itself ("rank 1/2: ..."), and a 1-process run's lines stay plain."""

    def process(self, msg, kwargs):
        kwargs.setdefault("stacklevel", 2)
        return msg, kwargs


def get_logger(name: str) -> Adapter:
    """Accelerate's logger for `name` (a module of a package), the package's handler set once."""
    package = logging.getLogger(name.split(".")[0])
    if not any(isinstance(h, TqdmHandler) for h in package.handlers):
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False  # not again through the root logger's handler
    return Adapter(logging.getLogger(name), {})
