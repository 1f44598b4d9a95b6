"""Running a helper program bounded in time and resources, and ending all of it when time is up.

The analysis runs its sandboxed worker this way and a snapshot runs gdb this way: both parse
or touch what a pod controls, so both run in a session of their own (a kill reaches every
process the helper started), under resource limits set in the child before it executes
(memory, file size), with no core of their own (a helper that crashes must not feed the
crash path it serves), and are killed as a group once the timeout passes, or once they have
written more than :data:`MAX_OUTPUT` (what they write is held in this process's memory: the
agent's, which every tenant's crashes go through).
"""

from __future__ import annotations

import os
import resource
import selectors
import signal
import subprocess
import time

#: what a helper may write, output and errors together, before it is ended
MAX_OUTPUT = 256 << 20


class TooMuchOutput(subprocess.SubprocessError):
    """The helper wrote more than its bound; it has been ended."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"wrote more than {limit >> 20} MiB")
        self.limit = limit


def read_both(
    out_fd: int, err_fd: int | None, deadline: float, limit: int | None = None
) -> tuple[bytes, bytes]:
    """Everything written to both pipes (``err_fd`` may be None) until both close.

    Raises ``subprocess.TimeoutExpired`` at ``deadline`` (monotonic) and :class:`TooMuchOutput`
    past ``limit`` bytes in all (:data:`MAX_OUTPUT` unless given); the caller ends the writer."""
    limit = MAX_OUTPUT if limit is None else limit
    chunks: dict[int, list[bytes]] = {fd: [] for fd in (out_fd, err_fd) if fd is not None}
    held = 0
    with selectors.DefaultSelector() as sel:
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired("helper", 0)
            for key, _ in sel.select(left):
                block = os.read(key.fd, 1 << 16)
                if not block:
                    sel.unregister(key.fd)
                    continue
                held += len(block)
                if held > limit:
                    raise TooMuchOutput(limit)
                chunks[key.fd].append(block)
    return b"".join(chunks[out_fd]), b"".join(chunks.get(err_fd, [])) if err_fd is not None else b""


def run(
    cmd: list[str],
    *,
    timeout: float,
    limits: dict[int, int],
    pass_fds: tuple[int, ...] = (),
    stderr: int = subprocess.PIPE,
    cwd: str | None = None,
    max_output: int | None = None,
) -> tuple[bytes, bytes, int]:
    """Run ``cmd`` under ``limits`` (RLIMIT_* → soft and hard value); its output, errors and status.

    The errors are ``b""`` when ``stderr`` is not a pipe (``subprocess.STDOUT``: in the output).

    Raises ``subprocess.TimeoutExpired`` once the timeout has passed, :class:`TooMuchOutput` once
    it wrote more than ``max_output``; either way its session is killed.
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
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        out, err = read_both(
            proc.stdout.fileno(), proc.stderr.fileno() if proc.stderr else None, deadline, max_output
        )
        proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
    except (subprocess.TimeoutExpired, TooMuchOutput):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    return out, err, proc.returncode
