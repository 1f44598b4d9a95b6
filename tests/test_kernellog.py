"""Which kernel log lines mean a lost dump (the following of /dev/kmsg is tested with real skips)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from corevault import atomic, config, hostsetup, spool
from corevault.agent import kernellog
from corevault.agent.kernellog import KMSG, KernelLog, from_kernel, parse
from corevault.hostsetup import SYSCTLS, write_sysctl
from testbed import sysctl
from tests.conftest import Capture
from tests.tenants import pod
from tests.test_tenant_slots import skip_lines_named_again
from tests.waiting import wait_for


def test_a_skip_over_core_pipe_limit_is_a_lost_dump() -> None:
    record = parse("coredump: 25682(victimxyz): over core_pipe_limit, skipping core dump")
    assert record == {
        "ns_pid": 25682,
        "comm": "victimxyz",
        "reason": "the kernel did not dump victimxyz (pid 25682 in its namespace): over core_pipe_limit, skipping core dump",
    }


def test_a_comm_with_parentheses_and_escapes_is_kept_as_the_kernel_printed_it() -> None:
    record = parse("coredump: 7(a): b\\x1b(x): over core_pipe_limit, skipping core dump")
    assert record is not None and record["ns_pid"] == 7 and record["comm"] == "a): b\\x1b(x"


def test_rate_limited_reports_are_counted() -> None:
    record = parse("__coredump_report: 12 callbacks suppressed")
    assert record is not None and record["count"] == 12


def test_rate_limited_warnings_about_settings_are_not_lost_dumps() -> None:
    # printed by writing core_pattern and suid_dumpable in the wrong order, as seen on this kind of host
    assert parse("validate_coredump_safety: 10 callbacks suppressed") is None
    record = parse("coredump_pipe: 3 callbacks suppressed")  # 6.16+: the skip's own function
    assert record is not None and record["count"] == 3


def test_warnings_about_settings_are_not_lost_dumps() -> None:
    assert (
        parse("coredump: 5823(python): Unsafe core_pattern used with fs.suid_dumpable=2: set it first")
        is None
    )
    assert parse("m[24173]: segfault at 0 ip 0000559136037129 sp 00007ffdf6045940 error 6") is None


def test_a_line_only_counts_from_its_start_and_from_the_kernel_at_warning_level() -> None:
    quoted = "m[9]: segfault at 0 ip 0 sp 0 error 6 in coredump: 1(nginx): over core_pipe_limit, skipping core dump[1+2]"
    assert parse(quoted) is None
    assert parse("x[9]: segfault at 0 in coredump_pipe: 999 callbacks suppressed[1+2]") is None
    assert from_kernel("4") and from_kernel("3") and not from_kernel("6")  # a segfault line is info
    assert not from_kernel(str(1 << 3 | 4))  # written to /dev/kmsg by a process (LOG_USER)


class FakeKmsg:
    """A FIFO standing in for /dev/kmsg: one record per write, read one at a time between polls."""

    def __init__(self, tmp_path) -> None:
        self.path = str(tmp_path / "kmsg")
        os.mkfifo(self.path)
        self.settings = config.Settings(str(tmp_path / "state"))
        os.makedirs(self.settings.state_dir)
        atomic.write(os.path.join(self.settings.state_dir, kernellog.STATE_NAME), f"{kernellog._boot_id()} 0")
        self.counted: list[int] = []
        self.follower = KernelLog(self.settings, self.path, on_skip=self.counted.append)
        assert self.follower._open()
        self.fd = os.open(self.path, os.O_WRONLY)
        self.seq = 0

    def says(self, message: str, seconds_ago: float = 0.0) -> None:
        """The kernel logs ``message`` (at the warning level), stamped ``seconds_ago``."""
        self.seq += 1
        usec = int((time.clock_gettime(time.CLOCK_MONOTONIC) - seconds_ago) * 1e6)
        os.write(self.fd, f"4,{self.seq},{usec},-;{message}\n".encode())
        self.follower.poll()

    def journal(self) -> list[dict]:
        return spool.read_journal(self.settings.spool_dir)

    def close(self) -> None:
        os.close(self.fd)
        self.follower.close()


def test_a_suppressed_count_is_not_counted_again_while_each_death_is_journaled(tmp_path) -> None:
    """Process events journal every death one by one: a suppressed count of a window they
    followed wholly would count those dumps twice; one from before they listened still counts."""
    kmsg = FakeKmsg(tmp_path)
    try:
        kmsg.says("coredump_pipe: 7 callbacks suppressed")  # nothing follows the deaths yet
        kmsg.follower.deaths_followed_since = time.time() - 1
        kmsg.says("coredump_pipe: 5 callbacks suppressed", seconds_ago=0)  # its window began before
        kmsg.follower.deaths_followed_since = time.time() - 10
        kmsg.says("coredump_pipe: 3 callbacks suppressed")  # a window wholly followed
        kmsg.says("coredump: 42(worker): over core_pipe_limit, skipping core dump")  # named: still one
    finally:
        kmsg.close()
    assert kmsg.counted == [7, 5, 1], kmsg.counted
    assert [r.get("count") for r in kmsg.journal()] == [7, 5, None], kmsg.journal()


def test_messages_the_ring_buffer_overwrote_are_said(tmp_path, caplog, monkeypatch) -> None:
    kmsg = FakeKmsg(tmp_path)
    try:
        kmsg.says("coredump: 1(a): over core_pipe_limit, skipping core dump")
        kmsg.seq += 40  # what the reader gets after EPIPE: the oldest record still held
        real_read = os.read

        def overwritten_once(fd: int, n: int) -> bytes:
            monkeypatch.setattr(os, "read", real_read)
            raise BrokenPipeError(32, "Broken pipe")

        monkeypatch.setattr(os, "read", overwritten_once)
        kmsg.says("coredump: 2(b): over core_pipe_limit, skipping core dump")
    finally:
        kmsg.close()
    assert "overwrote 40 messages" in caplog.text, caplog.text
    assert [r["ns_pid"] for r in kmsg.journal()] == [1, 2]


# A tenant's executables named as the kernel's own lines: the segfault line the kernel prints for
# a crash (at the info level) ends with the executable's file name, unescaped.
FORGED = (
    "coredump: 1(nginx): over core_pipe_limit, skipping core dump",
    "coredump_pipe: 999 callbacks suppressed",
)


def _kernel_messages(fd: int) -> list[str]:
    """The messages /dev/kmsg holds past ``fd``'s position, moving it to the end."""
    out = []
    while True:
        try:
            raw = os.read(fd, 8192)
        except BlockingIOError:
            return out
        except BrokenPipeError:
            continue  # overwritten before it was read
        out.append(raw.decode(errors="replace").partition(";")[2].split("\n", 1)[0])


@pytest.mark.crash
def test_lines_that_quote_a_tenants_file_name_invent_no_lost_dumps(capture: Capture, rootfs: str) -> None:
    """A pod runs executables whose file names are a skip line and a rate-limit line: the kernel
    prints both names inside its segfault lines, and neither is journaled as a dropped dump."""
    settings = config.load(capture.config)
    skipped: list[int] = []
    follower = KernelLog(settings, on_skip=skipped.append)
    follower.poll()  # from now on
    seen = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    os.lseek(seen, 0, os.SEEK_END)
    script = "; ".join(
        f'cp /app/crasher "/data/dump-a/{name}" && "/data/dump-a/{name}" segv' for name in FORGED
    )
    printed: list[str] = []
    try:
        # The kernel prints at most ten segfault lines in five seconds (any crash on the host counts):
        # crash again once a window is over until both lines were printed.
        for _ in range(3):
            capture.crash(rootfs, ["/bin/sh", "-c", script + "; exit 1"], annotations=pod("tenant-a", "a-0"))
            printed += [m for m in _kernel_messages(seen) if "segfault" in m and any(f in m for f in FORGED)]
            if all(any(f in m for m in printed) for f in FORGED):
                break
            time.sleep(6)
    finally:
        os.close(seen)
    assert all(any(f in m for m in printed) for f in FORGED), (
        f"the kernel printed no segfault line naming {FORGED}"
    )
    follower.poll()
    follower.close()
    invented = [r for r in spool.read_journal(capture.spool) if r.get("transport") == "kernel"]
    assert not invented and not skipped, invented


@pytest.mark.crash
@pytest.mark.skipif(hostsetup.kernel_socket_mode() is None, reason="the coredump socket needs Linux 6.16+")
def test_a_dump_the_coredump_socket_had_no_room_for_is_a_lost_dump(
    capture: Capture, programs, tmp_path
) -> None:
    """In socket mode a crash loop can fill the listening socket's queue: the kernel then skips the
    next dumps, saying "Coredump socket PATH receive queue full". Here the socket takes one
    connection (listen(0)) and accepts none; of three crashes two are skipped, each journaled."""
    settings = config.load(capture.config)
    follower = KernelLog(settings)
    follower.poll()  # from now on
    path = str(tmp_path / "full.sock")
    crashed: list[subprocess.Popen] = []
    with sysctl.core_settings(), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(0)
        skip_lines_named_again()
        write_sysctl(SYSCTLS["core_pattern"], "@" + path)  # the capture's own is put back after
        try:
            crashed += [subprocess.Popen([programs["crasher"], "segv"]) for _ in range(3)]

            def skipped() -> list[dict]:
                follower.poll()
                return [r for r in capture.journal() if "receive queue full" in r.get("reason", "")]

            wait_for(lambda: len(skipped()) >= 2, "the two skipped dumps", timeout=15)
        finally:
            listener.close()  # the one connected dump ends
            for p in crashed:
                p.wait(timeout=30)
    follower.close()
    lost = skipped()
    assert len(lost) == 2 and {r["ns_pid"] for r in lost} < {p.pid for p in crashed}, lost
    assert all(
        r["event"] == "dropped" and r["comm"] == os.path.basename(programs["crasher"])[:15] for r in lost
    ), lost
