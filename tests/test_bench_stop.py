"""A benchmark stopped by SIGTERM stops the servers it started (bench/__init__.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.waiting import exited, wait_for

SCRIPT = """
import sys
{preamble}
from testbed import servers
with servers.seaweed() as w:
    print(w.proc.pid, flush=True)
    sys.stdin.read()
"""


def _started_then_terminated(preamble: str) -> int:
    """Run a bench-like process that starts SeaweedFS, SIGTERM it; the server's pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT.format(preamble=preamble)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert proc.stdout is not None
    server = int(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    return server


@pytest.mark.servers
def test_a_bench_stopped_by_sigterm_stops_its_servers() -> None:
    server = _started_then_terminated("import bench")
    wait_for(lambda: exited(server), "SeaweedFS to end with the bench that started it", timeout=10)
