"""Progress callbacks. Library code reports ``progress(task, done, total)`` and draws nothing itself; the command
line turns the calls into bars on a terminal or a few plain lines in a log (``cli_output``)."""
from __future__ import annotations

from typing import Callable, Optional

Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: ``done`` of ``total`` units of the task named ``task`` (e.g. "fold 1/4 epochs");
``done == total`` ends it."""


def counter(progress: Optional[Progress], task: str, total: int) -> Optional[Callable[[int], None]]:
    """A callback advancing ``task`` by ``n`` units per call, announced at 0 of ``total``; ``None`` when there is
    no one to tell or nothing to do."""
    if progress is None or total <= 0:
        return None
    done = 0
    progress(task, 0, total)

    def advance(n: int) -> None:
        nonlocal done
        done = min(total, done + n)
        progress(task, done, total)
    return advance


def prefixed(progress: Optional[Progress], prefix: str) -> Optional[Progress]:
    """``progress`` with every task name prefixed (a fold, a stage), or ``None``."""
    if progress is None:
        return None
    return lambda task, done, total: progress(f"{prefix}{task}", done, total)
