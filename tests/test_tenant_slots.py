"""One pod's dumps never hold all of the kernel's pipe slots; the dumps the kernel skips are journaled.

The kernel starts at most ``core_pipe_limit`` pipe handlers at once and skips every other
dump. Tenant A's pod crashes six times; each dump corevault admits is held still (its
handler is stopped while it still reads the core, as a dump of 64 GiB of mostly zeros would
hold it for minutes; a handler lets go of the pipe once the core is read), and then tenant B's
pod (another namespace) crashes. The limit is lowered to 4 for the test, so
the point is made with a few small cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from contextlib import ExitStack

import pytest

from corevault import config, hostsetup, spool
from corevault.agent.kernellog import KMSG, KernelLog, parse
from corevault.hostsetup import SYSCTLS, write_sysctl
from testbed import build, runc
from tests.conftest import Capture
from tests.tenants import held_handler, of_namespace, pod
from tests.test_socket_mode import socket_capture
from tests.waiting import wait_for

pytestmark = pytest.mark.crash


class HeldDumps:
    """Tenant A's crashes, each of whose admitted dumps is held still while its core is still read
    (:func:`tests.tenants.held_handler`) until :meth:`release`."""

    def __init__(self, capture: Capture, rootfs: str) -> None:
        self.capture = capture
        self.rootfs = rootfs
        self.pod_uid = runc.new_pod_uid()
        self.held: list[int] = []
        self.holds = ExitStack()

    def crash(self) -> None:
        """One more crash of A; returns once its dump is held, refused or skipped."""
        c = runc.Container(
            # 256 MiB, half of it data to compress: read for a few hundred ms, long enough to be
            # stopped while still reading (the entry appears before the first byte is read)
            self.rootfs, ["/app/crasher", "alloc", "256"], volume=self.capture.volume,
            annotations=pod("tenant-a", "a-0"), pod_uid=self.pod_uid,
        )  # fmt: skip
        tmp = spool.tmp_dir(self.capture.spool)
        before = set(os.listdir(tmp)) if os.path.isdir(tmp) else set()
        captured = len(self.capture.entries())

        def admitted() -> int | None:
            """The crashed process's host PID, once its spool entry is made (its handler is past
            the dump slots): spool ids carry it."""
            new = set(os.listdir(tmp)) - before if os.path.isdir(tmp) else set()
            return int(min(new).split("-")[1]) if new else None

        held = self.holds.enter_context(
            held_handler(self.capture.handler, c.run, reading=True, crashed=admitted, besides=self.held)
        )
        assert held or len(self.capture.entries()) == captured, (
            "the dump was read to its end before it could be held"
        )
        self.held += held

    def release(self) -> None:
        """Let the held handlers go on (the last held first) and wait for their ends."""
        self.holds.close()


def test_a_pods_dumps_never_take_every_pipe_slot(capture: Capture, rootfs: str) -> None:
    write_sysctl(SYSCTLS["core_pipe_limit"], "4")  # the capture fixture restores it
    a = HeldDumps(capture, rootfs)
    try:
        for _ in range(6):
            a.crash()
        capture.crash(rootfs, ["/app/crasher", "segv"], annotations=pod("tenant-b", "b-0"))
        b = of_namespace(capture.journal(), "tenant-b")
    finally:
        a.release()
    assert [r["event"] for r in b] == ["captured"], b  # B's crash was not skipped by the kernel
    refused = [r for r in of_namespace(capture.journal(), "tenant-a") if r["event"] == "dropped"]
    assert len(refused) == 4 and all(
        "dumps of this pod are being captured already" in r["reason"] for r in refused
    )
    assert len([m for m in capture.entries() if m["pod"]["namespace"] == "tenant-a"]) == 2


def running_pid(container: runc.Container) -> int | None:
    """The host PID of the container's process while it runs (crashed and dumping included)."""
    try:
        return container.pid()
    except (subprocess.CalledProcessError, ValueError, KeyError):
        return None


SKIP_WINDOW = 5  # s: the kernel names at most ten skipped dumps in this long (per line of its code)


def skip_lines_named_again() -> None:
    """Wait until a skipped dump is named in the kernel's log again.

    The kernel rate-limits its skip lines: past ten in five seconds it names no more until
    the five seconds from the first are over, and tells the rest only as a count with its next
    skip line. Any crash on the host skipped shortly before (another test's, anyone's: the
    pattern is the host's) may have used up that window; once five seconds have passed since
    the last skip line it printed, every window it opened is over and the next skip is named.
    """
    fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    last = None
    try:
        while True:
            try:
                raw = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:
                continue  # overwritten before it was read
            head, _, body = raw.decode(errors="replace").partition(";")
            if parse(body.split("\n", 1)[0]) is not None:
                last = int(head.split(",")[2]) / 1e6  # s since boot
    finally:
        os.close(fd)
    if last is not None:
        # /dev/kmsg stamps and CLOCK_MONOTONIC both count from boot; a second's slack between them
        time.sleep(max(0.0, last + SKIP_WINDOW + 1 - time.clock_gettime(time.CLOCK_MONOTONIC)))


def test_a_dump_the_kernel_skips_is_journaled_as_dropped(capture: Capture, rootfs: str) -> None:
    """Tenant A's dump holds the only pipe slot (its handler stopped while it reads): tenant B's
    crash is skipped by the kernel, which names it in its log, and that is journaled."""
    settings = config.load(capture.config)
    skipped = []
    follower = KernelLog(settings, on_skip=skipped.append)
    follower.poll()  # from now on
    write_sysctl(SYSCTLS["core_pipe_limit"], "1")
    comm = "cv" + uuid.uuid4().hex[:10]
    a = runc.Container(rootfs, ["/app/crasher", "alloc", "256"], volume=capture.volume,
                       annotations=pod("tenant-a", "a-0"))  # fmt: skip
    with held_handler(capture.handler, a.run, reading=True, crashed=lambda: running_pid(a)) as held:
        assert held, "tenant A's dump was expected to hold the only pipe slot"
        skip_lines_named_again()
        capture.crash(rootfs, ["/app/crasher", "comm", comm], annotations=pod("tenant-b", "b-0"))

    def journaled() -> list[dict]:
        follower.poll()
        return [r for r in spool.read_journal(capture.spool) if r.get("comm") == comm]

    wait_for(journaled, 10)
    mine = journaled()
    assert len(mine) == 1 and mine[0]["event"] == "dropped" and mine[0]["transport"] == "kernel", mine
    assert "over core_pipe_limit" in mine[0]["reason"] and skipped
    assert not [r for r in of_namespace(capture.journal(), "tenant-b") if r["event"] == "captured"]
    follower.close()


FLOOD = (
    "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do "
    "(while [ ! -e /data/dump-a/stop ]; do /app/crasher alloc 16; done) & done; wait"
)


@pytest.mark.skipif(
    hostsetup.kernel_socket_mode() != "@@", reason="the coredump socket with requests needs 6.17+"
)
def test_a_pods_crash_loops_never_crowd_out_another_pods_crashes_in_socket_mode(rootfs: str) -> None:
    """Twelve crash loops in tenant A's pod while tenant B's pod crashes five times: B keeps all five."""
    with socket_capture() as s:
        # A pod may have as many containers as it likes, each with a storm budget of its own.
        s.settings.storm_max = 1 << 20
        volume = os.path.join(s.dir, "a-vol")
        os.mkdir(volume)
        a = runc.Container(rootfs, ["/bin/sh", "-c", FLOOD], volume=volume,
                           annotations={**pod("tenant-a", "a-0"), "corevault.io/targets": "vault"})  # fmt: skip
        flood = threading.Thread(target=a.run, kwargs={"timeout": 300})
        flood.start()
        try:
            tmp = spool.tmp_dir(s.settings.spool_dir)
            wait_for(lambda: os.path.isdir(tmp) and os.listdir(tmp))  # A's dumps are being read
            for i in range(5):
                runc.Container(rootfs, ["/app/crasher", "segv"], volume=s.volume,
                               annotations=pod("tenant-b", f"b-{i}")).run()  # fmt: skip
        finally:
            with open(os.path.join(volume, "stop"), "w"):
                pass
            flood.join(300)
        s.settle()
        journal = s.journal()
    b = of_namespace(journal, "tenant-b")
    assert [r["event"] for r in b] == ["captured"] * 5, b
    a_events = [r["event"] for r in of_namespace(journal, "tenant-a")]
    assert a_events.count("dropped") > 0 and a_events.count("captured") > 0  # A was refused beyond its share


def heavy_crash(capture: Capture, tmp_path, files: int) -> runc.Container:
    """A crash of tenant A's pod (a new one) whose ``/app/mapmany /app/big`` maps ``files`` ELF
    files of 384 MiB each (zeros past the program), uncached: hashing them keeps the handler at
    work after it let go of the pipe."""
    mapmany = build.build_variant("mapmany", "mapmany.c", ["gcc", "-O1", "-Wall", "-Werror"])
    heavy = runc.build_rootfs(str(tmp_path / "heavy"), {"mapmany": mapmany})
    os.makedirs(os.path.join(heavy, "app", "big"))
    for i in range(files):
        big = os.path.join(heavy, "app", "big", str(i))
        shutil.copyfile(mapmany, big)
        with open(big, "r+b") as f:
            f.truncate(384 << 20)
    return runc.Container(heavy, ["/app/mapmany", "/app/big"], volume=capture.volume,
                          annotations=pod("tenant-a", "a-0"))  # fmt: skip


def test_a_pods_dumps_hold_its_slots_until_their_handlers_end(
    capture: Capture, rootfs: str, tmp_path
) -> None:
    """The kernel lets a crashed process go once its core is read; the handler then hashes and
    stores the binaries it mapped (up to [capture] max_objects_size of them, uncached on a
    pod's own volume). The pod's slots stay held until that work ends, so one pod's crash loop
    never has more of its handlers at work than its share, whatever the kernel's slots allow.
    Here the pod's share is one: its first handler is stopped after letting go of the pipe, and
    its next crash is refused while another pod's is captured."""
    capture.configure("[capture]\npod_dumps = 1\nnamespace_dumps = 4\n")
    first = heavy_crash(capture, tmp_path, 2)
    with held_handler(capture.handler, first.run, reading=False) as held:
        assert held, "the first handler ended before it could be stopped after letting go"
        capture.crash(
            rootfs, ["/app/crasher", "segv"], annotations=pod("tenant-a", "a-0"), pod_uid=first.pod_uid
        )
        capture.crash(rootfs, ["/app/crasher", "segv"], annotations=pod("tenant-b", "b-0"))
    a = [r["event"] for r in of_namespace(capture.journal(), "tenant-a")]
    assert sorted(a) == ["captured", "dropped"], a  # the second crash found the pod's one slot held
    [dropped] = [r for r in of_namespace(capture.journal(), "tenant-a") if r["event"] == "dropped"]
    assert "dumps of this pod" in dropped["reason"]
    assert [r["event"] for r in of_namespace(capture.journal(), "tenant-b")] == ["captured"]


def test_a_handler_timed_out_after_letting_go_says_so_and_leaves_no_entry(
    capture: Capture, rootfs: str, tmp_path
) -> None:
    """A pod makes its handler's work after the pipe slow (binaries of its own to hash, uncached):
    the handler's timer still runs, and when it strikes there the dump is dropped with the
    timeout as its reason (not a handler failure), no spool entry is left half made, and the
    pod's slot is free for its next crash. The handler is stopped after letting go of the pipe
    until its timeout has passed."""
    capture.configure("[capture]\ntimeout = 3\npod_dumps = 1\n")
    first = heavy_crash(capture, tmp_path, 1)
    with held_handler(capture.handler, first.run, reading=False) as held:
        assert held, "the handler ended before it could be stopped after letting go"
        time.sleep(3.2)  # the handler's timer (3 s from its start) expires while it is stopped
    journal = of_namespace(capture.journal(), "tenant-a")
    assert [r["event"] for r in journal] == ["dropped"], journal
    assert "handler timeout after 3s, after the core was read" in journal[0]["reason"], journal[0]
    assert not [r for r in capture.journal() if r["event"] == "error"], capture.journal()
    assert capture.entries() == [] and os.listdir(spool.tmp_dir(capture.spool)) == []
    # the pod's one slot was given back: its next crash is captured
    capture.crash(rootfs, ["/app/crasher", "segv"], annotations=pod("tenant-a", "a-0"), pod_uid=first.pod_uid)
    assert [r["event"] for r in of_namespace(capture.journal(), "tenant-a")] == ["dropped", "captured"]
