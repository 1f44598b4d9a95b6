"""Every core-signal death is journaled once, even when the kernel's log has stopped naming skips.

The kernel names at most ten skipped dumps in five seconds. With the only pipe slot held by
tenant A's dump, twelve host processes crash (ten named in the log, two not), then tenant B's
pod crashes (not named either): the kernel's process events connector accounts for the three
the log left out, B's under its pod, and nothing is journaled twice.
"""

from __future__ import annotations

import faulthandler
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from corevault import config, hostsetup, spool
from corevault.agent.kernellog import KernelLog
from corevault.agent.loop import Agent
from corevault.agent.procevents import ProcEvents, tenant
from corevault.hostsetup import SYSCTLS, write_sysctl
from testbed import runc, sysctl
from tests.conftest import Capture
from tests.tenants import held_handler, of_namespace, pod
from tests.test_tenant_slots import running_pid, skip_lines_named_again
from tests.waiting import wait_for

pytestmark = pytest.mark.crash

GRACE = 2.0


def records_of(capture: Capture, host_pid: int) -> list[dict]:
    """The records of a host process: the kernel's log names it by its PID (the host's own)."""
    return [
        r for r in spool.read_journal(capture.spool)
        if r.get("pid") == host_pid or (r.get("source") == "kernel log" and r.get("ns_pid") == host_pid)
    ]  # fmt: skip


def settle(follower: KernelLog, events: ProcEvents) -> None:
    """One pass as the agent makes it (the kernel's log first), then one past every grace period."""
    follower.poll()
    events.reconcile()
    later = time.monotonic() + 10 * GRACE
    events.reconcile(later)
    events.reconcile(later + 10 * GRACE)


def test_skips_the_kernel_log_leaves_out_are_journaled_once(capture: Capture, rootfs: str, programs) -> None:
    settings = config.load(capture.config)
    follower = KernelLog(settings)
    follower.poll()  # from now on
    events = ProcEvents(settings, grace=GRACE)
    assert events.start(), "the kernel's process events connector could not be had"
    try:
        write_sysctl(SYSCTLS["core_pipe_limit"], "1")  # the capture fixture restores it
        a = runc.Container(rootfs, ["/app/crasher", "alloc", "256"], volume=capture.volume,
                           annotations=pod("tenant-a", "a-0"))  # fmt: skip
        hosts: list[int] = []
        with held_handler(capture.handler, a.run, reading=True, crashed=lambda: running_pid(a)) as held:
            assert held, "tenant A's dump was expected to hold the only pipe slot"
            a_pid = running_pid(a)
            skip_lines_named_again()  # the twelve open a window of the kernel's log of their own
            for _ in range(12):
                host = subprocess.Popen([programs["crasher"], "segv"])
                host.wait()
                hosts.append(host.pid)
            # B's process holds 64 MiB: its exit takes long enough for its pod to be read
            capture.crash(rootfs, ["/app/crasher", "alloc", "64"], annotations=pod("tenant-b", "b-0"))

        def all_journaled() -> bool:
            follower.poll()
            events.reconcile()
            return all(records_of(capture, p) for p in hosts) and bool(
                of_namespace(capture.journal(), "tenant-b")
            )

        wait_for(all_journaled, "a record of each of the thirteen crashes", timeout=30)
        wait_for(lambda: of_namespace(capture.journal(), "tenant-a"), "tenant A's record", timeout=30)
        settle(follower, events)
    finally:
        events.close()
        follower.close()

    by_log = 0
    for p in hosts:
        mine = records_of(capture, p)
        assert len(mine) == 1, mine
        by_log += mine[0]["source"] == "kernel log"
    assert by_log <= 10  # the kernel's log named no more than ten: the rest came from the connector
    (b,) = of_namespace(capture.journal(), "tenant-b")
    assert b["event"] == "dropped" and b["source"] == "process events", b
    assert b["pod"]["name"] == "b-0" and "core_pipe_limit" in b["reason"], b
    # tenant A's dump was captured by its handler: no record of the connector besides
    a_records = of_namespace(capture.journal(), "tenant-a")
    assert [r["event"] for r in a_records] == ["captured"], a_records
    assert not [r for r in capture.journal(a_pid) if r.get("source") == "process events"]


def _crash_host_processes(n: int) -> list[int]:
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child only dies
            resource.setrlimit(resource.RLIMIT_CORE, (1, 1))  # the kernel pipes no core: nothing is held
            faulthandler.disable()  # pytest's: the death is meant
            signal.signal(signal.SIGSEGV, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGSEGV)
            os._exit(1)
        pids.append(pid)
    return pids


def _reap(pids: list[int]) -> None:
    """Reap the dead children: until then their /proc tells (a race with the parent is not these tests')."""
    for pid in pids:
        os.waitpid(pid, 0)


def test_more_deaths_than_the_table_holds_are_counted(capture: Capture) -> None:
    """Five deaths, a table of three: the two oldest are journaled as a count. Anyone's crash on
    the host is a death too, so one may take a place: each of the five is then journaled or counted."""
    settings = config.load(capture.config)
    events = ProcEvents(settings, grace=GRACE, max_pending=3)
    assert events.start()
    try:
        pids = _crash_host_processes(5)
        wait_for(
            lambda: events.waiting(pids[-1]) or sum(n for n, _ in events.given_up.values()) >= 5,
            "the five deaths",
            timeout=10,
        )
        _reap(pids)
        later = time.monotonic() + 10 * GRACE
        events.reconcile(later)
        events.reconcile(later + 10 * GRACE)
    finally:
        events.close()
    mine = [r for r in spool.read_journal(capture.spool) if r.get("source") == "process events"]
    (counted,) = [r for r in mine if "count" in r]
    assert counted["event"] == "dropped" and counted["count"] >= 2, mine
    # the kept: the kernel piped no core (RLIMIT_CORE 1), so no handler journaled them; each is
    # journaled once, as the host's processes that asked for no cores are
    kept = [[r for r in mine if r.get("pid") == pid] for pid in pids]
    assert all(len(k) <= 1 for k in kept) and sum(map(len, kept)) + counted["count"] >= 5, mine
    assert all(r["event"] == "skipped" and r["pod"]["source"] == "none" for k in kept for r in k), mine


def test_an_overrun_of_the_socket_is_journaled(capture: Capture) -> None:
    settings = config.load(capture.config)
    events = ProcEvents(settings, grace=GRACE, rcvbuf=1)  # the kernel's smallest buffer: a few events
    assert events.start()
    try:
        with events.lock:  # the listener stops at its first event, the buffer fills
            _reap(_crash_host_processes(40))
        wait_for(lambda: events.overruns, "an overrun", timeout=10)
        events.reconcile()
    finally:
        events.close()
    lost = [r for r in spool.read_journal(capture.spool) if "overran" in r.get("reason", "")]
    assert len(lost) == 1 and lost[0]["event"] == "dropped" and lost[0]["count"] >= 1, lost


def test_the_agent_listens_while_its_capture_is_installed_and_says_why(capture: Capture, programs) -> None:
    """A host process a rule opts in crashes with RLIMIT_CORE 1 (the kernel pipes nothing): the
    agent's listener journals it as dropped, saying so. The kernel's log is not read here, as when
    its window is used up; the agent stops listening once core_pattern is no longer its own."""
    comm = "cvrl" + os.urandom(4).hex()
    capture.configure(f'[[rules]]\ncomm = "{comm}"\npattern = "{capture.volume}/core-%p"\n')
    agent = Agent(config.load(capture.config))
    agent.listen = True  # as a long-running loop
    agent.check_installed()
    agent._follow_deaths()
    assert agent.proc_events is not None, "the agent did not listen"
    try:
        crashed = subprocess.Popen(["prlimit", "--core=1", programs["crasher"], "comm", comm])
        # reaped once seen (a zombie's /proc still tells): a race with the parent is not this test's
        wait_for(lambda: agent.proc_events.waiting(crashed.pid), "the death", timeout=10)
        crashed.wait()
        later = time.monotonic() + 10 * GRACE
        agent.proc_events.reconcile(later)
        agent.proc_events.reconcile(later + 10 * GRACE)
        agent.installed = False  # core_pattern is someone else's now
        agent._follow_deaths()
        assert agent.proc_events is None
    finally:
        agent._close()
    (record,) = capture.journal(crashed.pid)
    assert record["event"] == "dropped" and record["pod"]["source"] == "rules", record
    assert "RLIMIT_CORE is 1" in record["reason"], record


#: in a network namespace of its own, as the DaemonSet's agent is: the connector's socket, and
#: the event of a crash (RLIMIT_CORE 0: the event comes before any dump, and nothing is dumped)
LISTEN_FROM_A_POD_NETWORK = """
import os, resource, subprocess, sys
from corevault.agent import procevents
assert os.stat("/proc/self/ns/net").st_ino != procevents.INIT_NET_INO
sock = procevents.open_connector()
sock.settimeout(10)
crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
child = subprocess.Popen(
    [sys.executable, "-c", crash], preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
)
child.wait()
while (procevents.parse(sock.recv(8192)) or (0,))[0] != child.pid:
    pass
print("seen")
"""


def test_an_agent_in_a_network_namespace_of_its_own_listens_from_the_hosts() -> None:
    """The DaemonSet's agent has no hostNetwork: it makes the connector's socket in the host's
    network namespace (kthreadd's; PID 1's namespace files may be closed even to root)."""
    with sysctl.core_settings():  # the crash goes where the host's pattern says: none is changed
        done = subprocess.run(
            ["unshare", "--net", sys.executable, "-c", LISTEN_FROM_A_POD_NETWORK],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.stdout.strip() == "seen", done.stderr


@pytest.mark.skipif(hostsetup.kernel_socket_mode() is None, reason="the coredump socket needs Linux 6.16+")
def test_a_skip_in_socket_mode_is_said_to_be_the_sockets(capture: Capture, rootfs: str, tmp_path) -> None:
    """core_pattern names a coredump socket nobody listens on (the capture's own is put back after):
    the kernel skips the pod's dump, and the record says the socket did not take it, not that a pipe
    limit was reached (no pipe limit counts socket dumps)."""
    settings = config.load(capture.config)
    events = ProcEvents(settings, grace=GRACE)
    assert events.start()
    try:
        with sysctl.core_settings():  # the pattern is read as a death is journaled: the socket's yet
            write_sysctl(SYSCTLS["core_pattern"], f"@{tmp_path}/nobody.sock")
            c = runc.Container(rootfs, ["/app/crasher", "alloc", "64"], annotations=pod("tenant-b", "b-0"))
            c.run()
            wait_for(lambda: any(tenant(d) == "tenant-b" for d in list(events.pending.values())), "the death")
            events.reconcile()
            events.reconcile(time.monotonic() + 10 * GRACE)
    finally:
        events.close()
    (b,) = of_namespace(capture.journal(), "tenant-b")
    assert b["event"] == "dropped" and b["source"] == "process events", b
    assert "coredump socket did not take it" in b["reason"] and "core_pipe_limit" not in b["reason"], b
