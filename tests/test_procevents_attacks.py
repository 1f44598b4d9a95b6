"""A tenant's crashes may not hide another tenant's skipped dump from the process events' records.

Tenant B's pod crashes once, its dump skipped (RLIMIT_CORE 1: the kernel pipes nothing). Tenant A
then attacks from pods of its own: a crash loop that fills the table of waiting deaths, or a
crash of its own as B's process is known to the kernel's log (PID 1 in its namespace, the
same comm) while the log left B's line out. Either way B's skip is journaled under B's pod.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time

import pytest

from corevault import config
from corevault.agent.kernellog import KernelLog
from corevault.agent.procevents import CRASH_TIME_SLACK, ProcEvents, open_connector, tenant
from testbed import runc
from tests.conftest import Capture
from tests.tenants import of_namespace, pod
from tests.test_tenant_slots import skip_lines_named_again
from tests.waiting import wait_for

pytestmark = pytest.mark.crash

GRACE = 2.0
#: tenant B's process: its dump skipped, its 64 MiB make its exit slow enough for its pod to be read
SKIPPED = ["/app/crasher", "alloc", "64"]


def skipped_crash(rootfs: str, args: list[str], namespace: str, name: str, volume: str | None = None) -> None:
    """A pod whose processes' dumps the kernel skips (RLIMIT_CORE 1) runs ``args`` to its end."""
    runc.Container(rootfs, args, volume=volume, annotations=pod(namespace, name), rlimit_core=(1, 1)).run()


def waiting(events: ProcEvents, namespace: str) -> int:
    with events.lock:
        return sum(tenant(d) == namespace for d in events.pending.values())


def settle(events: ProcEvents, follower: KernelLog | None = None) -> None:
    """Passes as the agent makes them (the kernel's log first), then past every grace period."""
    if follower is not None:
        follower.poll()
    events.reconcile()
    later = time.monotonic() + 10 * GRACE
    events.reconcile(later)
    events.reconcile(later + 10 * GRACE)


def test_a_crash_loop_gives_up_its_own_waiting_deaths_not_another_tenants(
    capture: Capture, rootfs: str
) -> None:
    settings = config.load(capture.config)
    events = ProcEvents(settings, grace=GRACE, max_pending=4)
    assert events.start()
    try:
        skipped_crash(rootfs, SKIPPED, "tenant-b", "b-0")
        wait_for(lambda: waiting(events, "tenant-b"), "tenant B's death", timeout=10)
        loop = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do /app/crasher alloc 16; done; echo done"
        skipped_crash(rootfs, ["/bin/sh", "-c", loop], "tenant-a", "a-0")
        wait_for(lambda: sum(n for n, _ in events.given_up.values()) >= 8, "A's deaths given up", timeout=10)
        settle(events)
    finally:
        events.close()
    (b,) = of_namespace(capture.journal(), "tenant-b")
    assert b["event"] == "dropped" and b["source"] == "process events" and "count" not in b, b
    assert b["pod"]["name"] == "b-0" and "RLIMIT_CORE is 1" in b["reason"], b
    # what was given up is A's (or the host's: a process gone before its pod was read counts with
    # the host's, as do the host's own crashes meanwhile), said so under its pod, never B's
    counted = [r for r in capture.journal() if "count" in r and r.get("source") == "process events"]
    assert sum(r["count"] for r in counted) >= 8, counted
    assert not [r for r in counted if (r.get("pod") or {}).get("namespace") == "tenant-b"], counted
    assert any((r.get("pod") or {}).get("namespace") == "tenant-a" for r in counted), counted


def test_a_pods_line_in_the_kernel_log_does_not_account_for_anothers_skip(
    capture: Capture, rootfs: str
) -> None:
    """B's process and A's are both PID 1 of their pods and have one name: the kernel's line of
    A's skip fits B's death too. The log leaves B's line out (read from after it here, as the
    kernel's rate limit leaves it out once a burst used its window): A's line accounts for A's
    death, the nearest, and B's is journaled under B's pod. (A crashes again should anyone's
    crashes on the host have used the log's window up meanwhile: each of its deaths with no line
    is journaled under A, as it should be.)"""
    name = "cv" + os.urandom(6).hex()  # the comm both take: the kernel's 15 bytes of it
    comm = name[:15]
    run = ["/bin/sh", "-c", f"cp /app/crasher /data/dump-a/{name} && exec /data/dump-a/{name} alloc 64"]
    settings = config.load(capture.config)
    events = ProcEvents(settings, grace=GRACE)
    assert events.start()
    follower = KernelLog(settings)

    def lines() -> list[dict]:
        follower.poll()
        return [r for r in capture.journal() if r.get("source") == "kernel log" and r.get("comm") == comm]

    tries = 0
    try:
        skipped_crash(rootfs, run, "tenant-b", "b-0", capture.volume)
        wait_for(lambda: waiting(events, "tenant-b"), "tenant B's death", timeout=10)
        follower.poll()  # from now on: B's line is left out
        while not lines() and tries < 3:
            skip_lines_named_again()
            skipped_crash(rootfs, run, "tenant-a", "a-0", capture.volume)
            tries += 1
            wait_for(lambda: waiting(events, "tenant-a"), "tenant A's death", timeout=10)
            with contextlib.suppress(AssertionError):
                wait_for(lines, "the kernel's line of A's skip", timeout=5)
        settle(events, follower)
    finally:
        events.close()
        follower.close()
    assert len(lines()) == 1 and lines()[0]["ns_pid"] == 1, capture.journal()
    (b,) = of_namespace(capture.journal(), "tenant-b")
    assert b["event"] == "dropped" and b["source"] == "process events" and b["ns_pid"] == 1, b
    assert b["pod"]["name"] == "b-0" and "RLIMIT_CORE is 1" in b["reason"], b
    assert len(of_namespace(capture.journal(), "tenant-a")) == tries - 1, capture.journal()


def take_pid(pid: int, cgroups: list[str], then: str = "sleep 60") -> subprocess.Popen:
    """A process with ``pid`` (just freed), moved into ``cgroups``, then running ``then``: the
    host's next PID is set to it (ns_last_pid), tried again when another process took it first."""
    move = " && ".join(f"echo $$ > {d}/cgroup.procs" for d in cgroups)
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        child = subprocess.Popen(["sh", "-c", f"{move} && echo moved && exec {then}"], stdout=subprocess.PIPE)
        if child.pid == pid:
            assert child.stdout is not None and child.stdout.readline() == b"moved\n", (
                "not in the pod's cgroups"
            )
            return child
        child.kill()
        child.wait()
    raise AssertionError(f"PID {pid} could not be had")


def cgroups_of(pid: int) -> list[str]:
    """The directories of the process's cgroups, in each hierarchy (v1 and v2)."""
    dirs = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f.read().splitlines():
            _, controllers, path = line.split(":", 2)
            hierarchy = controllers.split(",")[0].removeprefix("name=") or "unified"
            if not os.path.isdir(f"/sys/fs/cgroup/{hierarchy}"):
                hierarchy = ""  # cgroup v2 alone
            dirs.append(os.path.normpath(f"/sys/fs/cgroup/{hierarchy}/{path}"))
    return dirs


def test_a_death_read_once_its_pid_is_another_pods_process_is_not_that_pods(
    capture: Capture, rootfs: str
) -> None:
    """Tenant A's process dies, its dump skipped, while the agent's listener is behind (as a flood
    of events leaves it); by the time the event is read, A's PID is a process of tenant B's pod
    (the node's PIDs wrap at pid_max). The death is journaled as the process's whose pod could
    not be read, not under B's pod."""
    settings = config.load(capture.config)
    events = ProcEvents(settings, grace=GRACE)
    events.sock = open_connector()  # events queue from now on; the listener starts later
    events.sock.settimeout(0.5)
    b = runc.Container(
        rootfs, ["/bin/sh", "-c", "echo ready; exec sleep 60"], annotations=pod("tenant-b", "b-0")
    )
    taker = None
    try:
        with b.running():
            b_cgroups = cgroups_of(b.pid())
            a = runc.Container(rootfs, ["/bin/sh", "-c", "echo ready; sleep 0.2; exec /app/crasher"],
                               annotations=pod("tenant-a", "a-0"), rlimit_core=(1, 1))  # fmt: skip
            with a.running() as crashing:
                a_pid = a.pid()
                crashing.wait(timeout=30)
            wait_for(lambda: not os.path.exists(f"/proc/{a_pid}"), "A's process to be reaped", timeout=10)
            taker = take_pid(a_pid, b_cgroups)
            events.thread = threading.Thread(target=events._listen, daemon=True)
            events.thread.start()
            wait_for(lambda: events.waiting(a_pid), "A's death", timeout=10)
            taker.kill()
            taker.wait()
            settle(events)
    finally:
        if taker is not None and taker.poll() is None:
            taker.kill()
            taker.wait()
        events.close()
    assert not of_namespace(capture.journal(), "tenant-b"), capture.journal()
    (a_record,) = [r for r in capture.journal(a_pid) if r.get("source") == "process events"]
    assert a_record["event"] == "dropped" and not a_record["pod"], a_record
    assert "gone before its pod could be read" in a_record["reason"], a_record


def test_a_crash_under_the_pid_of_anothers_skipped_death_does_not_account_for_it(
    capture: Capture, rootfs: str, programs: dict[str, str]
) -> None:
    """Tenant B's dump is skipped; seconds later (within the grace) a process of tenant A's pod (by
    its cgroups) gets B's PID (the node's PIDs wrap at pid_max) and crashes, captured: the record of
    A's crash names that PID, and B's death is still journaled under B's pod."""
    settings = config.load(capture.config)
    events = ProcEvents(settings, grace=GRACE)
    assert events.start()
    a = runc.Container(
        rootfs, ["/bin/sh", "-c", "echo ready; exec sleep 60"], annotations=pod("tenant-a", "a-0")
    )
    try:
        with a.running():
            skipped_crash(rootfs, SKIPPED, "tenant-b", "b-0")
            wait_for(lambda: waiting(events, "tenant-b"), "tenant B's death", timeout=10)
            with events.lock:
                (b_death,) = [d for d in events.pending.values() if tenant(d) == "tenant-b"]
            wait_for(
                lambda: not os.path.exists(f"/proc/{b_death.pid}"), "B's process to be reaped", timeout=10
            )
            time.sleep(max(0.0, b_death.when + 2 * CRASH_TIME_SLACK - time.time()))  # seconds after B's
            crashing = take_pid(b_death.pid, cgroups_of(a.pid()), then=f"{programs['crasher']} segv")
            crashing.wait(timeout=30)
            wait_for(lambda: capture.journal(b_death.pid), "the record of A's crash", timeout=30)
            settle(events)
    finally:
        events.close()
    records = capture.journal(b_death.pid)  # A's crash's, by its handler, and B's death's
    assert [r["pod"]["namespace"] for r in records if r.get("source") != "process events"] == ["tenant-a"]
    (b,) = of_namespace(capture.journal(), "tenant-b")
    assert b["event"] == "dropped" and b["source"] == "process events" and b["pid"] == b_death.pid, b
