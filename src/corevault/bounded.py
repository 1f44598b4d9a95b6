"""Running a helper program bounded in time and resources, and ending all of it when time is up.

The analysis runs its sandboxed worker this way and a snapshot runs gdb this way: both parse
or touch what a pod controls, so both run in a session of their own (a kill reaches every
process the helper started), under resource limits set in the child before it executes
(memory, file size), with no core of their own (a helper that crashes must not feed the
crash path it serves), and are killed as a group once the timeout passes.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess


def run(
    cmd: list[str],
    *,
    timeout: float,
    limits: dict[int, int],
    pass_fds: tuple[int, ...] = (),
    stderr: int = subprocess.PIPE,
    cwd: str | None = None,
) -> tuple[bytes, bytes, int]:
    """Run ``cmd`` under ``limits`` (RLIMIT_* → soft and hard value); its output, errors and status.

    The errors are ``b""`` when ``stderr`` is not a pipe (``subprocess.STDOUT``: in the output).

    Raises ``subprocess.TimeoutExpired`` once the timeout has passed and its session is killed.
    """
    rlimits = [(which, (value, value)) for which, value in limits.items()]
    rlimits.append((resource.RLIMIT_CORE, (0, 0)))

    def set_limits() -> None:
        for which, value in rlimits:
            resource.setrlimit(which, value)

    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        pass_fds=pass_fds,
        preexec_fn=set_limits,  # noqa: PLW1509 - only setrlimit, async-signal-safe enough
        start_new_session=True,
        cwd=cwd,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return out, err or b"", proc.returncode
