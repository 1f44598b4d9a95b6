"""Dumps the kernel skipped, read from its log and journaled like any other lost dump.

Some crashes never reach corevault: with ``core_pipe_limit`` handlers already running the
kernel skips the dump and only says so in its log (``coredump: 4242(worker): over
core_pipe_limit, skipping core dump``); so does a pattern whose handler cannot be started.
The agent follows ``/dev/kmsg`` and turns each such line into a ``dropped`` journal record
(shipped, counted in ``corevault_dumps_dropped`` and ``corevault_kernel_skipped_dumps``),
so a tenant whose crash was crowded out sees why.

What the kernel tells is little: the PID as the crashed process's own namespace numbers
it, and its comm; the process is gone by then, so the record names no pod. The kernel
rate-limits these lines (``…: N callbacks suppressed`` follows a burst): those are
journaled as one record with the count, unless the agent's process events
(:mod:`corevault.agent.procevents`) were listening all through the burst: they journal each
of those dumps under its pod, and the count would count them twice. The position read (the records' sequence
number, with the boot's id) is kept in the state directory, so a restarted agent neither
repeats nor misses what the ring buffer still holds; the first start begins at the end.

A tenant names things the kernel prints in other lines: its comm starts the segfault line
(``COMM[PID]: segfault at … in FILE[…]``, at the info level) and its executable's file name,
unescaped and up to 255 bytes, ends it. A file named ``coredump: 1(nginx): over
core_pipe_limit, skipping core dump`` would put a whole skip line inside that one. So a
message counts only when the kernel itself logged it (facility 0) at the warning level or
above, as every coredump and rate-limit line is, and only when it starts with what the
kernel's own line starts with.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Callable

from corevault import atomic, config, spool

log = logging.getLogger("corevault.agent")
KMSG = "/dev/kmsg"
STATE_NAME = "kmsg.seq"
#: ``coredump: PID(COMM): MESSAGE``; the comm (15 bytes) is escaped by the kernel (%pE, up to four
#: characters a byte), so the last ``): `` within 64 characters ends it
LINE = re.compile(r"coredump: (\d+)\((.{0,64})\): (.*)")
#: the most severe level a line of another subsystem quoting a tenant's names has (KERN_INFO is 6)
WARNING = 4
#: what the kernel says when a dump is lost (other coredump lines are warnings about settings)
#: ("receive queue full": in socket mode, the listening socket's queue had no room for the dump)
LOST = ("skipping core dump", "aborting core", "failed", "receive queue full")
SUPPRESSED = re.compile(r"(\w*coredump\w*): (\d+) callbacks suppressed")
#: seconds the kernel's rate limit counts suppressed lines over before it reports them (its
#: DEFAULT_RATELIMIT_INTERVAL): a count is stamped with the line that ends the window
RATELIMIT_INTERVAL = 5
#: functions whose rate-limited lines warn about settings and lose no dump (the unsafe
#: core_pattern and suid_dumpable warning that writing those settings prints)
WARNINGS_ONLY = frozenset({"validate_coredump_safety"})


def parse(message: str) -> dict | None:
    """The journal record for one kernel log message, or None when it is not about a lost dump.

    Both patterns must match from the message's start: a tenant's names fill the rest of lines.
    """
    if m := LINE.match(message):
        pid, comm, what = m.groups()
        if not any(word in what.lower() for word in LOST):
            return None
        reason = f"the kernel did not dump {comm} (pid {pid} in its namespace): {what.strip()}"
        return {"ns_pid": int(pid), "comm": comm, "reason": reason}
    if (m := SUPPRESSED.fullmatch(message)) and m.group(1) not in WARNINGS_ONLY:
        n = int(m.group(2))
        return {"count": n, "reason": f"the kernel did not report {n} more coredump messages (rate-limited)"}
    return None


def from_kernel(prefix: str) -> bool:
    """Whether a /dev/kmsg record's prefix (facility << 3 | level) says the kernel logged it at
    the warning level or above; what a process writes to /dev/kmsg has a facility of its own."""
    return prefix.isdigit() and int(prefix) >> 3 == 0 and int(prefix) & 7 <= WARNING


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "-"


class KernelLog:
    """Follows /dev/kmsg without blocking; :meth:`poll` journals what arrived since the last call."""

    def __init__(
        self, settings: config.Settings, path: str = KMSG, on_skip: Callable[[int], object] | None = None
    ):
        self.settings = settings
        self.path = path
        self.on_skip = on_skip
        self.fd = -1
        self.state = os.path.join(settings.state_dir, STATE_NAME)
        self.last = self._saved()
        self.boot = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
        #: since when (wall clock) every core-signal death is journaled one by one by the process
        #: events, or None: a suppressed count of a window wholly after it is not journaled again
        self.deaths_followed_since: float | None = None

    def _saved(self) -> int | None:
        """The last sequence number read in this boot; -1 after a reboot (read all), None the first time."""
        try:
            with open(self.state, "rb") as f:
                boot, seq = f.read(128).split()
            return int(seq) if boot.decode() == _boot_id() else -1
        except (OSError, ValueError):
            return None

    def _open(self) -> bool:
        if self.fd >= 0:
            return True
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False  # no /dev/kmsg (a container without it): nothing to follow
        if self.last is None:
            os.lseek(self.fd, 0, os.SEEK_END)  # the first start: only what happens from now on
        return True

    def poll(self) -> int:
        """Journal the skipped dumps logged since the last call; returns how many records were written."""
        if not self._open():
            return 0
        written = 0
        newest = self.last
        overwritten = False
        while True:
            try:
                raw = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records were overwritten before we read them
                    overwritten = True
                    continue
                log.warning("cannot read the kernel log (%s): its skipped dumps are not journaled", e)
                break
            if not raw:
                break
            head, _, body = raw.decode(errors="replace").partition(";")
            fields = head.split(",")
            if len(fields) < 3 or not fields[1].isdigit():
                continue
            seq = int(fields[1])
            if self.last is not None and seq <= self.last:
                continue
            if overwritten:
                overwritten = False
                self._lost(seq - (newest if newest is not None else seq - 1) - 1)
            newest = seq
            record = parse(body.split("\n", 1)[0]) if from_kernel(fields[0]) else None
            if record is None:
                continue
            stamp = self.boot + int(fields[2]) / 1e6 if fields[2].isdigit() else time.time()
            if "count" in record and self._followed(stamp - RATELIMIT_INTERVAL):
                log.debug("%d coredump lines left out: each dump is journaled by itself", record["count"])
                continue
            spool.ensure(self.settings.spool_dir)
            spool.journal(
                self.settings.spool_dir,
                {
                    "event": "dropped", "transport": "kernel", "source": "kernel log",
                    "node": self.settings.node_name, "time": stamp, **record,
                },
            )  # fmt: skip
            written += 1
            if self.on_skip is not None:
                self.on_skip(record.get("count", 1))
        if newest is not None and newest != self.last:
            self.last = newest
            atomic.write(self.state, f"{_boot_id()} {newest}")
        return written

    def _lost(self, n: int) -> None:
        """Say that the ring buffer overwrote ``n`` messages unread (which ones, nobody can tell)."""
        if n > 0 and not self._followed(time.time()):
            log.warning(
                "the kernel's log overwrote %d messages before the agent read them: dumps it skipped"
                " among them are not journaled (poll more often, or let the agent follow process events)",
                n,
            )

    def _followed(self, since: float) -> bool:
        return self.deaths_followed_since is not None and since >= self.deaths_followed_since

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
