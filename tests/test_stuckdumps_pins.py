"""The agent's stuck-dump watch reads a process it saw dumping through a fd of that process.

A PID the watch recorded may be another process's by the time it reads it again (the first one
ended, the kernel handed its PID out anew, another pod's process got it). The reuse is forced for
real: the host's ``ns_last_pid`` is set to just below the PID, so the next fork gets it (tried
again when another fork on the host took it first). That the first process was dumping is told
to the watch (``dumping`` answers yes for it): a dump stuck on FUSE is set up by
tests/test_pod_fuse.py; here only what comes after the look matters.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from corevault import config
from corevault.agent import stuckdumps
from tests.waiting import wait_for

LAST_PID = "/proc/sys/kernel/ns_last_pid"


def sleeper() -> subprocess.Popen:
    """A process that runs ``sleep`` (exec'd already)."""
    p = subprocess.Popen(["sleep", "1000"])
    wait_for(lambda: _cmdline(p.pid).startswith(b"sleep\0"), "sleep's exec", 10)
    return p


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def reuse(pid: int) -> subprocess.Popen:
    """A new process under ``pid`` (whose process has been reaped), started at least a clock
    tick (10 ms) after it: start times are counted in ticks."""
    time.sleep(0.03)
    for _ in range(50):
        with open(LAST_PID, "w") as f:
            f.write(str(pid - 1))
        new = sleeper()
        if new.pid == pid:
            return new
        new.kill()
        new.wait()
    pytest.fail(f"PID {pid} could not be handed out again (other forks on the host took it first)")


@pytest.fixture
def swapped() -> list[subprocess.Popen]:
    """Processes started by a test, ended after it."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="setting ns_last_pid needs root")
def test_a_pinned_process_reads_nothing_of_the_process_that_reused_its_pid(swapped: list) -> None:
    first = sleeper()
    swapped.append(first)
    with stuckdumps.Proc(first.pid) as proc:
        start = proc.start
        assert proc.read("cmdline").startswith(b"sleep\0")
        first.kill()
        first.wait()
        second = reuse(first.pid)
        swapped.append(second)
        assert os.path.exists(f"/proc/{first.pid}/cmdline")  # the PID names the second process now
        with pytest.raises(OSError):
            proc.read("cgroup")
        with pytest.raises(OSError):
            list(proc.lines("mountinfo"))
    with pytest.raises(stuckdumps.Gone):
        stuckdumps.pinned(first.pid, start)  # its start time tells the second one apart


@pytest.mark.skipif(os.geteuid() != 0, reason="setting ns_last_pid needs root")
def test_a_pid_reused_after_the_look_is_dropped_from_the_watch(
    monkeypatch: pytest.MonkeyPatch, tmp_path, swapped: list
) -> None:
    """Seen dumping past the deadline, the process ends and its PID goes to another process
    before the watch looks at its mounts: the watch drops it, and reads and aborts nothing of the
    other process (read by number, its maps, mountinfo, cgroup and namespace were taken for the
    first one's)."""
    settings = config.Settings()
    settings.state_dir, settings.spool_dir, settings.timeout = str(tmp_path / "s"), str(tmp_path / "p"), 1.0
    watch = stuckdumps.StuckDumps(settings)
    first = sleeper()
    swapped.append(first)
    with stuckdumps.Proc(first.pid) as proc:
        start = proc.start
    watch.first_seen[first.pid] = (start, 0.0)  # seen dumping long ago

    def dumping(proc: stuckdumps.Proc) -> bool:
        if proc.pid != first.pid or proc.start != start:
            return False
        # the look saw it dumping; then it ends and its PID is another process's
        first.kill()
        first.wait()
        swapped.append(reuse(first.pid))
        return True

    looked: list[int] = []
    monkeypatch.setattr(stuckdumps, "dumping", dumping)
    monkeypatch.setattr(stuckdumps, "stuck_on", lambda proc: looked.append(proc.pid) or ({}, set(), set()))
    monkeypatch.setattr(stuckdumps, "abort", lambda dev: pytest.fail(f"aborted {dev!r}"))
    assert watch.check(now=100.0) == 0
    assert looked == []
    assert first.pid not in watch.first_seen
