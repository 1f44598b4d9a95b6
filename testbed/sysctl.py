"""Guard for tests that change the host's core settings: one at a time, always restored."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from corevault.hostsetup import SYSCTLS, read_sysctls, write_sysctl

LOCK = "/run/lock/corevault-core-settings.lock"


_depth = [0]  # how deep this process is inside core_settings(): the lock is taken once


@contextmanager
def core_settings() -> Iterator[dict[str, str]]:
    """Hold the host-wide lock, yield the saved values, and write them back on the way out.

    Nested uses in one process share the lock (a second flock on a new open file would
    wait for ourselves forever) and each restores what it saved.
    """
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    with open(LOCK, "w") as lock:
        if _depth[0] == 0:
            fcntl.flock(lock, fcntl.LOCK_EX)
        _depth[0] += 1
        saved = read_sysctls()
        try:
            yield saved
        finally:
            _depth[0] -= 1
            for key, path in SYSCTLS.items():
                write_sysctl(path, saved[key])


def repair_dangling_pattern() -> str | None:
    """If core_pattern pipes to a handler that no longer exists, reset it to the default.

    Such a pattern (left by a killed test run) silently loses every crash on the host.
    Returns the pattern that was removed, if any.
    """
    pattern = read_sysctls()["core_pattern"]
    if pattern.startswith("|") and not os.access(pattern[1:].split(" ", 1)[0], os.X_OK):
        write_sysctl(SYSCTLS["core_pattern"], "core")
        return pattern
    return None
