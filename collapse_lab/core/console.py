"""The console: what a person sees while the lab runs, in one place.

- A stage says one line when it starts and one when it ends, in any output (a terminal or a file),
  flushed at once (`say`): a log written to a file reads like the terminal, and in time.
- Progress bars only on a terminal (`progress_bars`), and only the outermost command's: the ablation
  draws one bar for the whole run and turns its stages' own bars and lines off (`quiet_stages`,
  `note`), so two worker processes never interleave theirs.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

STAGE_BARS = "COLLAPSE_LAB_STAGE_BARS"  # "0": the stages' own progress bars off (inherited by worker processes)


def progress_bars() -> bool:
    """Whether a stage may draw a progress bar: stdout is a terminal and no outer command owns the console."""
    return sys.stdout.isatty() and os.environ.get(STAGE_BARS, "1") != "0"


@contextmanager
def quiet_stages() -> Iterator[None]:
    """An outer command (the ablation) owns the console while inside: its stages, in this process and in the
    worker processes it starts meanwhile, draw no bars and say no lines of their own."""
    before = os.environ.get(STAGE_BARS)
    os.environ[STAGE_BARS] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(STAGE_BARS, None)
        else:
            os.environ[STAGE_BARS] = before


def note(line: str) -> None:
    """A stage's own line (saved, resumed, found finished): said when the stage runs alone; under an outer
    command that owns the console (the ablation), whose line per stage start and end says it already, not."""
    if os.environ.get(STAGE_BARS, "1") != "0":
        say(line)


def say(line: str) -> None:
    """One line to stdout, written and flushed at once (one write: lines of two processes do not mix)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@contextmanager
def quiet_logger(*names: str, level: int = logging.ERROR):
    """Library loggers held at `level` for one call whose warnings say nothing to the user (and nothing the
    lab does not handle: a tied embedding saved once, a fresh score head loaded on purpose)."""
    loggers = [logging.getLogger(n) for n in names]
    before = [x.level for x in loggers]
    for x in loggers:
        x.setLevel(level)
    try:
        yield
    finally:
        for x, b in zip(loggers, before):
            x.setLevel(b)
