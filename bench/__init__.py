"""corevault's benchmarks: each ``python -m bench.NAME`` measures against baselines taken in the same run.

A bench stopped by SIGTERM (``timeout``, a CI job's cancel, ``kill``) ends as one stopped by ^C: the
signal is raised as ``SystemExit`` in the main thread, so the ``finally`` blocks of
:mod:`testbed.servers` and the container helpers stop the SeaweedFS, PostgreSQL and containers it
started. Python's default for SIGTERM ends the process at once, and left them running, holding
ports, memory and temporary directories.
"""

import signal
import threading


def _stopped(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if (
    threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
):
    signal.signal(signal.SIGTERM, _stopped)
