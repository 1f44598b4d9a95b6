"""Waiting in tests for something another process or thread does: one loop for every test."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(check: Callable[[], object], what: str = "", timeout: float = 60, every: float = 0.01) -> object:
    """``check()``'s first true value, asked every ``every`` seconds; fails after ``timeout``
    seconds, saying it was waiting for ``what`` (the check itself, when not given)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(every)


def exited(pid: int) -> bool:
    """Whether process ``pid`` has ended: gone, or a zombie its parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
